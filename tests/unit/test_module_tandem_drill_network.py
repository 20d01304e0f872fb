"""tandem_drill_network on this machine's own network stack (the tests run as root): a real
bridge, namespace and veth pair are made, inspected and removed."""

from __future__ import annotations

import os
import subprocess

import pytest
from test_module_tandem_vm import run  # pytest puts tests/unit on sys.path

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make bridges and namespaces")


def net(expect_fail=False, check=False, **params):
    return run("tandem_drill_network", expect_fail=expect_fail, check=check, diff=False, **params)


@pytest.fixture
def names():
    tag = f"{os.getpid() % 100000}"
    bridge, netns = f"tdrt{tag}", f"tdrt-ns{tag}"
    yield bridge, netns
    subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
    subprocess.run(["ip", "link", "del", f"{bridge}-p"], check=False, capture_output=True)
    subprocess.run(["ip", "link", "del", bridge], check=False, capture_output=True)


def test_present_is_idempotent_check_mode_is_honest_and_absent_cleans_up(names):
    bridge, netns = names
    r = net(bridge=bridge, netns=netns, addresses=["192.0.2.1/24"], check=True)
    assert r["changed"] and r["exists"] == {"bridge": False, "netns": False}
    r = net(bridge=bridge, netns=netns, addresses=["192.0.2.1/24"])
    assert r["changed"] and r["exists"] == {"bridge": True, "netns": True}
    assert [p["name"] for p in r["ports"]] == [f"{bridge}-p"]
    assert r["bridge_addresses"] == [] and r["probe_addresses"] == ["192.0.2.1/24"]
    again = net(bridge=bridge, netns=netns, addresses=["192.0.2.1/24"])
    assert not again["changed"] and again["actions"] == []
    # The probe answers inside its namespace; the host has no route through the bridge to it
    # (asked with `ip route get`, so no packet leaves this machine).
    inside = subprocess.run(["ip", "netns", "exec", netns, "ping", "-c1", "-W1", "192.0.2.1"], check=False,
                            capture_output=True)
    route = subprocess.run(["ip", "route", "get", "192.0.2.1"], check=False, capture_output=True, text=True)
    assert inside.returncode == 0 and f"dev {bridge} " not in route.stdout
    moved = net(bridge=bridge, netns=netns, addresses=["198.51.100.1/24"])
    assert moved["probe_addresses"] == ["198.51.100.1/24"]
    r = net(bridge=bridge, netns=netns, state="absent", check=True)
    assert r["changed"] and r["exists"] == {"bridge": True, "netns": True}
    r = net(bridge=bridge, netns=netns, state="absent")
    assert r["changed"] and r["exists"] == {"bridge": False, "netns": False} and r["ports"] == []
    assert not net(bridge=bridge, netns=netns, state="absent")["changed"]


def test_names_that_do_not_fit_are_refused(names):
    r = net(bridge="a-very-long-bridge", netns="x", expect_fail=True)
    assert "at most 13 characters" in r["msg"]
