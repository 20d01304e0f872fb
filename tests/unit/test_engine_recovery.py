"""Resource-wide recovery points: one id over all volumes, manifests reconciled with the logs, retention."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

from tandem.engine import recovery
from tandem.engine.recovery import RecoveryPointError, RecoveryPoints

SIZE = 1 << 20


@pytest.fixture
def volumes(tmp_path):
    vols = []
    for n in range(2):
        path = tmp_path / f"disk{n}.img"
        path.write_bytes(bytes([n + 1]) * SIZE)
        fd = os.open(path, os.O_RDWR)
        vols.append(SimpleNamespace(number=n, fd=fd, size=SIZE, path=path))
    yield vols
    for v in vols:
        os.close(v.fd)


def rps_open(tmp_path, volumes) -> RecoveryPoints:
    # The delta chain's layout, wherever tmp_path is (test_engine_rpreflink.py covers "auto").
    return RecoveryPoints.open(str(tmp_path / "rp"), "a", volumes, storage="delta")


def write(rps: RecoveryPoints, vol, offset: int, data: bytes) -> None:
    if rps.needs_preserve(vol.number, offset, len(data)):
        rps.preserve(vol.number, offset, len(data))
    os.pwrite(vol.fd, data, offset)


def create(rps, reason="manual"):
    return rps.create(reason, role="Secondary", consistent=True, generations=["0", "0"])


def test_one_id_covers_every_volume_and_survives_reopen(tmp_path, volumes):
    rps = rps_open(tmp_path, volumes)
    m = create(rps)
    write(rps, volumes[0], 0, b"x" * 4096)
    write(rps, volumes[1], 8192, b"y" * 4096)
    rps.close()
    rps = rps_open(tmp_path, volumes)
    assert list(rps.manifests) == [m.id]
    assert rps.stores[0].read(m.id, 0, 4096) == b"\x01" * 4096
    assert rps.stores[1].read(m.id, 8192, 4096) == b"\x02" * 4096
    assert [len(r) for r in rps.changed_since(m.id)] == [1, 1]
    rps.close()


def test_logs_without_a_manifest_are_an_interrupted_create_and_go(tmp_path, volumes):
    rps = rps_open(tmp_path, volumes)
    m = create(rps)
    rps.close()
    os.unlink(tmp_path / "rp" / f"{m.id}.json")          # crashed before the manifest was written
    rps = rps_open(tmp_path, volumes)
    assert rps.manifests == {} and all(s.rp_ids() == [] for s in rps.stores)
    rps.close()


def test_a_manifest_whose_log_is_missing_is_dropped(tmp_path, volumes):
    rps = rps_open(tmp_path, volumes)
    m = create(rps)
    rps.close()
    os.unlink(tmp_path / "rp" / "vol1" / f"{m.id}.delta")
    rps = rps_open(tmp_path, volumes)
    assert rps.manifests == {} and rps.stores[0].rp_ids() == []
    rps.close()


def test_unreadable_manifest_is_a_clear_error(tmp_path, volumes):
    rps = rps_open(tmp_path, volumes)
    m = create(rps)
    rps.close()
    (tmp_path / "rp" / f"{m.id}.json").write_text("{not json")
    with pytest.raises(RecoveryPointError, match="unreadable RP manifest"):
        rps_open(tmp_path, volumes)


def test_retention_by_count_and_age_keeps_manual_and_protected_ones(tmp_path, volumes):
    rps = rps_open(tmp_path, volumes)
    manual = create(rps)
    scheduled = [create(rps, "scheduled") for _ in range(4)]
    auto = [create(rps, "pre-resync") for _ in range(recovery.AUTO_KEEP + 2)]
    gone = rps.expire(keep=2, max_age=0, protect=auto[0])
    assert set(gone) == {m.id for m in scheduled[:2]} | {auto[1].id}     # auto[0] is protected
    assert manual.id in rps.manifests and auto[0].id in rps.manifests
    # By age: everything scheduled older than max_age goes, whatever the count.
    m = rps.manifests[scheduled[2].id]
    m.created = time.time() - 3600
    assert rps.expire(keep=10, max_age=60, protect=auto[0]) == [scheduled[2].id]
    rps.close()


def test_delete_refuses_an_rp_in_use(tmp_path, volumes):
    rps = rps_open(tmp_path, volumes)
    m = create(rps)
    rps.export(m.id, ["r/0", "r/1"])
    with pytest.raises(RecoveryPointError, match="in use"):
        rps.delete(m.id)
    rps.unexport(m.id)
    rps.clone(m.id, "drill", ["r/0", "r/1"])
    with pytest.raises(RecoveryPointError, match="in use"):
        rps.delete(m.id)
    rps.delete_clone("drill")
    rps.delete(m.id)
    assert rps.manifests == {}
    rps.close()


def test_drop_all_works_with_exports_and_clones(tmp_path, volumes):
    rps = rps_open(tmp_path, volumes)
    a = create(rps)
    write(rps, volumes[0], 0, b"z" * 4096)
    b = create(rps)
    rps.export(a.id, ["r/0", "r/1"])
    rps.clone(b.id, "drill", ["r/0", "r/1"])
    assert sorted(rps.drop_all()) == sorted([a.id, b.id])
    assert rps.manifests == {} and rps.exports == {} and rps.clones == {}
    assert not [n for n in os.listdir(tmp_path / "rp") if n.endswith(".json")]
    rps.close()
    assert json.loads(json.dumps(rps.summary())) == {"count": 0, "last": None, "exports": [], "clones": [],
                                                     "storage": ["delta", "delta"]}


def test_a_chosen_id_is_kept_in_creation_order_and_never_reused_or_expired_by_the_engine(tmp_path, volumes):
    """tandem-center's RPs (reason "center", the id it chose): ordered by creation like the others,
    a second create of the same id refused, a bad id refused without a write, and the engine's own
    retention leaves them to the center."""
    rps = rps_open(tmp_path, volumes)
    first = create(rps, "scheduled")
    c = rps.create(recovery.CENTER, role="Primary", consistent=True, generations=["0", "0"],
                   rp_id="center-v1-20261130T041500Z")
    last = create(rps, "scheduled")
    with pytest.raises(RecoveryPointError, match="exists"):
        rps.create(recovery.CENTER, role="Primary", consistent=True, generations=["0", "0"], rp_id=c.id)
    with pytest.raises(ValueError):
        rps.create(recovery.CENTER, role="Primary", consistent=True, generations=["0", "0"], rp_id="../x")
    assert list(rps.manifests) == [first.id, c.id, last.id]
    rps.close()
    rps = rps_open(tmp_path, volumes)
    assert list(rps.manifests) == [first.id, c.id, last.id]           # creation order survives reopen
    assert rps.manifests[c.id].reason == "center"
    gone = rps.expire(keep=0, max_age=1e-9, protect=None)
    assert sorted(gone) == sorted([first.id, last.id]) and list(rps.manifests) == [c.id]
    rps.close()
