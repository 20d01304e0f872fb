"""tandem.dr.tandem_recovery_point_info, from the case table module_cases/tandem_recovery_point_info.yml."""

import pytest
from module_harness import load, run_case


@pytest.mark.parametrize("case", load("tandem_recovery_point_info"))
def test_tandem_recovery_point_info(case, tmp_path, monkeypatch):
    run_case("tandem_recovery_point_info", case, tmp_path, monkeypatch)
