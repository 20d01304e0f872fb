"""tandem.dr.tandem_recovery_point, from the case table module_cases/tandem_recovery_point.yml."""

import pytest
from module_harness import load, run_case


@pytest.mark.parametrize("case", load("tandem_recovery_point"))
def test_tandem_recovery_point(case, tmp_path, monkeypatch):
    run_case("tandem_recovery_point", case, tmp_path, monkeypatch)
