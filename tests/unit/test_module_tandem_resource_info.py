"""tandem.dr.tandem_resource_info, from the case table module_cases/tandem_resource_info.yml."""

import pytest
from module_harness import load, run_case


@pytest.mark.parametrize("case", load("tandem_resource_info"))
def test_tandem_resource_info(case, tmp_path, monkeypatch):
    run_case("tandem_resource_info", case, tmp_path, monkeypatch)
