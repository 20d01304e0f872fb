"""vip-moved with two REAL `tandem-center serve` instances, cp-a and cp-b, each in its own network
namespace with a dummy interface, both on the same (primary) database as the role deploys them.
The VIP address is moved between the namespaces as keepalived would move it between the nodes:
each instance sees it, or not, on its own interfaces; the holder is recorded, vip-moved is
raised, acknowledging it through the API accepts the new holder and clears it."""

import os
import sys
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# pytest puts tests/center on sys.path
from cp_harness import Center, netns, set_address  # noqa: E402
from test_cp_witness import cp_state, metrics  # noqa: E402
from test_monitor import sample, wait_for  # noqa: E402

VIP = "192.0.2.77"         # TEST-NET-1: never routed
KEY = "cp:vip-moved"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def vip_alerts(db) -> list[dict]:
    with db.connect(row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT id, state, details FROM alerts WHERE dedup_key = %s ORDER BY id",
                            (KEY,)).fetchall()


@pytest.fixture
def pair(tmp_path, db):
    tag = f"{os.getpid() % 100000}"
    with netns(f"tdcp-a-{tag}") as ns_a, netns(f"tdcp-b-{tag}") as ns_b:
        centers = {}
        try:
            for node, ns in (("cp-a", ns_a), ("cp-b", ns_b)):
                centers[node] = Center(tmp_path / node, db.dsn, {"control_plane": {
                    "enabled": True, "node_name": node, "vip": VIP, "interval": 0.5, "timeout": 2.0}},
                    netns=ns).start()
            yield centers, {"cp-a": ns_a, "cp-b": ns_b}
        finally:
            for c in centers.values():
                c.stop()


def move(namespaces: dict, to: str) -> None:
    for node, ns in namespaces.items():
        if node != to:
            set_address(ns, VIP, present=False, check=False)      # (may not be there)
    set_address(namespaces[to], VIP, present=True)


def test_vip_moved_raised_acknowledged_and_moved_back(db, pair):
    centers, namespaces = pair
    move(namespaces, "cp-a")
    wait_for(lambda: (lambda s: (s["vip_holder"], s["vip_expected"]) == ("cp-a", "cp-a"))(cp_state(db)),
             what="cp-a recorded as the first holder")
    assert sample(metrics(centers["cp-a"]), "tandem_control_plane_vip_held") == 1
    assert sample(metrics(centers["cp-b"]), "tandem_control_plane_vip_held") == 0
    time.sleep(1.5)                                # several checks of both: nothing has moved
    assert vip_alerts(db) == [] and cp_state(db)["vip"] == VIP

    move(namespaces, "cp-b")                       # keepalived moves the VIP
    alert = wait_for(lambda: next(iter(vip_alerts(db)), None), what="vip-moved raised")
    assert alert["state"] == "raised" and alert["details"] == {"from": "cp-a", "to": "cp-b"}
    assert cp_state(db)["vip_holder"] == "cp-b" and cp_state(db)["vip_expected"] == "cp-a"
    assert sample(metrics(centers["cp-b"]), "tandem_control_plane_vip_held") == 1
    time.sleep(1.5)
    assert len(vip_alerts(db)) == 1

    # The operator acknowledges through the API (either instance): cp-b becomes the expected
    # holder and the alert clears at the next check.
    token = db.tokens["operator"]
    r = centers["cp-a"].http.post(f"/api/v1/alerts/{alert['id']}/ack",
                                  headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    wait_for(lambda: vip_alerts(db)[0]["state"] == "cleared", what="vip-moved cleared after the ack")
    assert cp_state(db)["vip_expected"] == "cp-b"
    time.sleep(1.5)
    assert [a["state"] for a in vip_alerts(db)] == ["cleared"]

    move(namespaces, "cp-a")                       # and back: a new alert, cp-b -> cp-a
    wait_for(lambda: len(vip_alerts(db)) == 2, what="second vip-moved")
    second = vip_alerts(db)[1]
    assert second["state"] == "raised" and second["details"] == {"from": "cp-b", "to": "cp-a"}

    # The VIP on neither node (keepalived in FAULT on both): the holder is forgotten, the open
    # alert stays (nobody holds it; nothing says it came back).
    set_address(namespaces["cp-a"], VIP, present=False)
    wait_for(lambda: cp_state(db)["vip_holder"] is None, what="no holder")
    time.sleep(1.0)
    assert vip_alerts(db)[1]["state"] == "raised"
