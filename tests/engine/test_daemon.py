"""tandemd's control surface: adjust, bad config, events, status fields."""

from __future__ import annotations

import grp
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from .harness import REPO, Pair, free_ports


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.stop()


def test_bad_config_names_file_and_key_and_leaves_resources_running(pair):
    pair.start()
    pair.wait(pair.connected, what="connection")
    good = pair.a.config_dir / f"{pair.resource}.toml"
    text = good.read_text()
    good.write_text(text.replace("sync_timeout", "sync_timout") if "sync_timeout" in text
                    else text.replace("[tunables]", "[tunables]\nsync_timout = 1.0"))
    reply = pair.a.ctl("adjust", check=False)
    assert not reply["ok"]
    assert str(good) in reply["error"] and "sync_timout" in reply["error"]
    assert "did you mean 'sync_timeout'" in reply["error"]
    # The running resource is untouched and still connected.
    assert pair.a.status(pair.resource)["connection"] == "Connected"
    good.write_text(text)
    assert pair.a.ctl("adjust")["changed"] is False


def test_a_resource_that_cannot_start_is_a_clear_error_and_stops_nothing_else(pair):
    """A backing file in a directory that does not exist: at daemon start the other
    resources still start; `adjust` answers with the cause (no dropped connection),
    and starts the resource once the directory is there."""
    text = (pair.a.config_dir / f"{pair.resource}.toml").read_text()
    missing = pair.a.root / "nowhere"
    text = text.replace(f'resource = "{pair.resource}"', 'resource = "vm2"')
    text = text.replace(f"{pair.resource}/disk", "vm2/disk")
    text = text.replace(str(pair.a.root / "data" / "disk0.img"), str(missing / "disk0.img"))
    ports = iter(free_ports(2))
    text = re.sub(r'address = "127\.0\.0\.1:\d+"', lambda m: f'address = "127.0.0.1:{next(ports)}"', text)
    (pair.a.config_dir / "vm2.toml").write_text(text)
    pair.start()
    pair.wait(pair.connected, what="connection")         # the good resource runs
    assert [r["name"] for r in pair.a.ctl("status")["resources"]] == [pair.resource]
    reply = pair.a.ctl("adjust", "vm2", check=False)
    assert not reply["ok"]
    assert "resource 'vm2' did not start" in reply["error"] and str(missing) in reply["error"]
    assert "No such file or directory" in reply["error"]
    missing.mkdir()
    assert pair.a.ctl("adjust", "vm2")["changed"]
    assert sorted(r["name"] for r in pair.a.ctl("status")["resources"]) == [pair.resource, "vm2"]
    assert pair.a.status(pair.resource)["connection"] == "Connected"


def test_nbd_socket_group_is_set_at_start_and_changed_online_on_a_primary(pair):
    """nbd.group: QEMU run by libvirt (group kvm) must open the socket; a group change is a
    chown, so a Primary keeps serving; an unknown group is refused with its name."""
    group = grp.getgrnam("daemon")                      # any non-root group of the host
    pair.start_in_sync()
    sock, conf = pair.a.nbd_socket(pair.resource), pair.a.config_dir / f"{pair.resource}.toml"
    assert os.stat(sock).st_gid == 0 and stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    text = conf.read_text()
    conf.write_text(text + '[nbd]\ngroup = "daemon"\n')
    plan = pair.a.ctl("adjust", "--dry-run")["actions"]
    want = [("change-nbd", {"group": {"old": None, "new": "daemon"}})]
    assert [(a["kind"], a["detail"]) for a in plan] == want
    assert pair.a.ctl("adjust")["changed"]
    assert os.stat(sock).st_gid == group.gr_gid and stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    st = pair.a.status(pair.resource)
    assert st["role"] == "Primary" and st["connection"] == "Connected"      # not restarted
    conf.write_text(text + '[nbd]\ngroup = "no-such-group-here"\n')
    reply = pair.a.ctl("adjust", check=False)
    assert not reply["ok"] and "nbd.group 'no-such-group-here' is not a group on this host" in reply["error"]
    assert os.stat(sock).st_gid == group.gr_gid
    conf.write_text(text)
    assert pair.a.ctl("adjust")["changed"] and os.stat(sock).st_gid == os.getgid()
    # At daemon start the group is set before anyone can connect.
    conf.write_text(text + '[nbd]\ngroup = "daemon"\n')
    pair.a.ctl("secondary", pair.resource)
    pair.a.stop()
    pair.a.start()
    pair.wait(pair.connected, what="reconnection")
    assert os.stat(sock).st_gid == group.gr_gid


def test_adjust_is_idempotent_and_dry_run_changes_nothing(pair, tmp_path):
    pair.start()
    extra = pair.a.config_dir / "vm2.toml"
    text = (pair.a.config_dir / f"{pair.resource}.toml").read_text()
    text = text.replace(f'resource = "{pair.resource}"', 'resource = "vm2"')
    text = text.replace(f"{pair.resource}/disk", "vm2/disk").replace("disk0.img", "vm2-disk0.img")
    # The second resource gets its own replication ports.
    ports = iter(free_ports(2))
    text = re.sub(r'address = "127\.0\.0\.1:\d+"', lambda m: f'address = "127.0.0.1:{next(ports)}"', text)
    extra.write_text(text)
    plan = pair.a.ctl("adjust", "--dry-run")
    assert plan["dry_run"] and [a["kind"] for a in plan["actions"]] == ["add-resource"]
    assert [r["name"] for r in pair.a.ctl("status")["resources"]] == [pair.resource]
    applied = pair.a.ctl("adjust")
    assert applied["changed"]
    assert sorted(r["name"] for r in pair.a.ctl("status")["resources"]) == [pair.resource, "vm2"]
    assert pair.a.ctl("adjust")["changed"] is False
    extra.unlink()
    assert [a["kind"] for a in pair.a.ctl("adjust")["actions"]] == ["remove-resource"]
    assert [r["name"] for r in pair.a.ctl("status")["resources"]] == [pair.resource]


def test_events_stream_state_changes_as_json_lines(pair):
    pair.start()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "tandem.engine.ctl", "--socket", pair.a.control,
                             "events"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pair.wait(pair.connected, what="connection")
        pair.a.ctl("primary", pair.resource, "--force")
        pair.wait(pair.in_sync, timeout=60, what="sync")
        time.sleep(0.3)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "exists"
    for expected in ("role-changed", "new-generation", "handshake", "sync-started", "sync-finished"):
        assert expected in kinds, kinds
    assert all("ts" in e and "resource" in e for e in events)
    sync = next(e for e in events if e["event"] == "handshake" and e["strategy"] == "source-full")
    assert sync["rule"] == "just-created-peer"


def test_status_reports_what_an_operator_needs(pair):
    pair.start()
    pair.wait(pair.connected, what="connection")
    pair.a.ctl("primary", pair.resource, "--force")
    pair.wait(pair.in_sync, timeout=60, what="sync")
    st = pair.a.status(pair.resource)
    vol = st["volumes"][0]
    for key in ("disk", "peer_disk", "replication", "out_of_sync_bytes", "in_flight_bytes",
                "write_latency_us", "generation"):
        assert key in vol
    assert (st["role"], st["connection"], vol["disk"], vol["replication"]) == \
        ("Primary", "Connected", "UpToDate", "Established")
    human = subprocess.run([sys.executable, "-m", "tandem.engine.ctl", "--socket", pair.a.control,
                            "status"], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")}).stdout
    assert "role:Primary connection:Connected" in human and "disk:UpToDate" in human
