"""Slot arithmetic and retention of the RP schedules (tandem.center.schedules_slots), and the
[schedules] config section."""

import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from tandem.center import config as cfgmod  # noqa: E402
from tandem.center.schedules_slots import in_window, next_slot, rp_name, slot_start, to_expire  # noqa: E402
from tandem.engine.monitor import CENTER_RP_ID  # noqa: E402


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("now", "interval", "start"), [
    ("2026-11-30T04:17:59", 300, "2026-11-30T04:15:00"),
    ("2026-11-30T04:15:00", 300, "2026-11-30T04:15:00"),      # a boundary belongs to the new slot
    ("2026-11-30T04:14:59.999", 300, "2026-11-30T04:10:00"),
    ("2026-11-30T04:17:59", 3600, "2026-11-30T04:00:00"),
    ("2026-11-30T04:17:59", 86400, "2026-11-30T00:00:00"),
    ("2026-11-30T04:17:59", 7, None),                          # not a divisor of a minute: still aligned
])
def test_slot_start_is_aligned_on_the_epoch(now, interval, start):
    s = slot_start(ts(now), interval)
    assert s % interval == 0 and s <= ts(now) < s + interval
    if start:
        assert s == ts(start)
    assert next_slot(ts(now), interval) == s + interval


def test_every_instant_of_a_slot_maps_to_it_and_windows_do_not_overlap():
    interval = 2
    base = ts("2026-11-30T04:00:00")
    for i in range(400):
        t = base + i * 0.013
        s = slot_start(t, interval)
        assert in_window(s, interval, t)
        assert not in_window(s - interval, interval, t) and not in_window(s + interval, interval, t)


def test_slot_start_refuses_a_non_positive_interval():
    with pytest.raises(ValueError):
        slot_start(1.0, 0)


def test_rp_names_are_deterministic_unique_and_accepted_by_the_engine():
    s = ts("2026-11-30T04:15:00")
    assert rp_name(7, s) == rp_name(7, s) == "center-v7-20261130T041500Z"
    names = {rp_name(vm, s + k * 2) for vm in (1, 2, 10**12) for k in range(100)}
    assert len(names) == 300
    for name in names:
        assert CENTER_RP_ID.fullmatch(name), name
        assert re.fullmatch(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", name)      # recovery_points.name
    assert CENTER_RP_ID.fullmatch(rp_name(2**63 - 1, ts("9999-12-31T23:59:59")))   # the longest


def test_retention_keeps_the_newest():
    done = [(float(t), f"rp{t}") for t in (10, 40, 20, 30, 50)]
    assert sorted(to_expire(done, 3)) == ["rp10", "rp20"]
    assert to_expire(done, 5) == [] and to_expire(done, 99) == []
    assert to_expire([], 1) == []
    assert sorted(to_expire(done, 1)) == ["rp10", "rp20", "rp30", "rp40"]
    with pytest.raises(ValueError):
        to_expire(done, 0)


def test_schedules_config(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[database]\ndsn = "x"\n[schedules]\nenabled = true\ntick = 1\n')
    with pytest.raises(cfgmod.ConfigError, match="monitor.client_cert"):
        cfgmod.load(str(f), env={})
    f.write_text('[database]\ndsn = "x"\n[monitor]\nclient_cert = "c"\nclient_key = "k"\nengine_ca = "a"\n'
                 "[schedules]\nenabled = true\ntick = 0.5\nretry_s = 1\n")
    cfg = cfgmod.load(str(f), env={})
    assert cfg.schedules.enabled and cfg.schedules.tick == 0.5 and cfg.schedules.retry_s == 1.0
    assert not cfg.monitor.enabled                      # schedules do not need the monitor on
    f.write_text('[database]\ndsn = "x"\n[schedules]\ntick = 0\n')
    with pytest.raises(cfgmod.ConfigError, match="tick"):
        cfgmod.load(str(f), env={})
    f.write_text('[database]\ndsn = "x"\n[schedules]\nevery = 3\n')
    with pytest.raises(cfgmod.ConfigError, match="unknown key"):
        cfgmod.load(str(f), env={})
