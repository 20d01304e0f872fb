"""tandem.dr.tandem_replication, from the case table module_cases/tandem_replication.yml."""

import pytest
from module_harness import load, run_case


@pytest.mark.parametrize("case", load("tandem_replication"))
def test_tandem_replication(case, tmp_path, monkeypatch):
    run_case("tandem_replication", case, tmp_path, monkeypatch)
