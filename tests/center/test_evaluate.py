"""tandem.center.evaluate: modes and alert conditions from engine status documents (the shape
tandemd's status gives; the live pair is in test_monitor.py)."""

from tandem.center.evaluate import (
    Policy,
    control_plane_conditions,
    control_plane_evaluated,
    figures,
    mode,
    resource_conditions,
)

NOW = 1_000_000.0
POLICY = Policy(vm="web1", rp_interval_s=600, sync_timeout_s=30)


def status(**kw) -> dict:
    res = {"name": "vm1", "role": "Primary", "connection": "Connected", "standalone": None, "degraded": None,
           "rpo": {"bytes": 0, "seconds": 0.0}, "recovery_points": None,
           "volumes": [{"replication": "Established", "out_of_sync_bytes": 0}]}
    return {**res, **kw}


def kinds(res, policy=POLICY, rpo_max_bytes=0) -> list[str]:
    return [c[1] for c in resource_conditions("a", res, policy, NOW, rpo_max_bytes)]


def test_modes():
    assert mode(status()) == "in-sync"
    assert mode(status(volumes=[{"replication": "SyncSource", "out_of_sync_bytes": 5}])) == "syncing"
    assert mode(status(degraded={"since": NOW}, connection="Connecting")) == "degraded"
    assert mode(status(connection="StandAlone", standalone={"kind": "split-brain"})) == "split-brain"
    assert mode(status(connection="StandAlone", standalone={"kind": "refused"})) == "standalone"


def test_degraded_only_past_the_policy():
    assert kinds(status(degraded={"since": NOW - 29, "kind": "peer-gone"})) == []
    assert kinds(status(degraded={"since": NOW - 31, "kind": "peer-gone"})) == ["degraded"]


def test_rpo_exposure_seconds_and_bytes():
    assert kinds(status(rpo={"bytes": 4096, "seconds": 599.0})) == []
    assert kinds(status(rpo={"bytes": 4096, "seconds": 601.0})) == ["rpo-exposure"]
    assert kinds(status(rpo={"bytes": 4096, "seconds": 1.0}), rpo_max_bytes=1024) == ["rpo-exposure"]


def test_last_rp_age():
    rps = {"count": 3, "last": {"id": "x", "age_seconds": 1199.0}}
    assert kinds(status(recovery_points=rps)) == []
    rps["last"]["age_seconds"] = 1201.0
    assert kinds(status(recovery_points=rps)) == ["rp-age"]
    assert figures(status(recovery_points=rps))["last_rp_age_s"] == 1201.0


def test_split_brain_even_without_a_policy():
    res = status(connection="StandAlone", standalone={"kind": "split-brain", "reason": "both primary"})
    conds = resource_conditions("a", res, None, NOW)
    assert [(c[0], c[1], c[2]) for c in conds] == [("engine:a:vm1:split-brain", "split-brain", "critical")]


def test_control_plane_seam():
    assert control_plane_conditions({}) == []
    got = control_plane_conditions({"witness_reachable": False, "sync_standbys": 0,
                                    "vip_holder": "cp-b", "vip_expected": "cp-a"})
    assert [c[1] for c in got] == ["witness-down", "db-sync-lost", "vip-moved"]
    assert control_plane_conditions({"witness_reachable": True, "sync_standbys": 1,
                                     "vip_holder": "cp-a", "vip_expected": "cp-a"}) == []


def test_control_plane_db_sync_from_the_monitor_when_pg_stat_replication_is_unknown():
    in_sync = [{"name": "cp-a", "reported": "primary", "goal": "primary"},
               {"name": "cp-b", "reported": "secondary", "goal": "secondary"}]
    alone = [{"name": "cp-a", "reported": "wait_primary", "goal": "wait_primary"},
             {"name": "cp-b", "reported": "catchingup", "goal": "secondary"}]
    assert control_plane_conditions({"formation": in_sync}) == []
    got = control_plane_conditions({"formation": alone})
    assert [c[1] for c in got] == ["db-sync-lost"] and got[0][4]["formation"] == alone
    # pg_stat_replication, when readable, decides; the monitor's view goes in the details
    assert control_plane_conditions({"sync_standbys": 1, "formation": alone}) == []
    got = control_plane_conditions({"sync_standbys": 0, "formation": in_sync})
    assert got[0][4] == {"sync_standbys": 0, "formation": in_sync}


def test_control_plane_evaluated_keys():
    assert control_plane_evaluated({}) == set()
    assert control_plane_evaluated({"witness_reachable": None, "sync_standbys": None, "formation": None,
                                    "vip_holder": None, "vip_expected": "cp-a"}) == set()
    assert control_plane_evaluated({"witness_reachable": True, "formation": [],
                                    "vip_holder": "cp-b", "vip_expected": "cp-a"}) == {
        "cp:witness-down", "cp:db-sync-lost", "cp:vip-moved"}
