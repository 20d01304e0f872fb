"""tandem.dr.tandem_resource, from the case table module_cases/tandem_resource.yml."""

import pytest
from module_harness import load, run_case


@pytest.mark.parametrize("case", load("tandem_resource"))
def test_tandem_resource(case, tmp_path, monkeypatch):
    run_case("tandem_resource", case, tmp_path, monkeypatch)
