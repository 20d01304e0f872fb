"""tandem.dr.tandem_role, from the case table module_cases/tandem_role.yml."""

import pytest
from module_harness import load, run_case


@pytest.mark.parametrize("case", load("tandem_role"))
def test_tandem_role(case, tmp_path, monkeypatch):
    run_case("tandem_role", case, tmp_path, monkeypatch)
