"""Verify tandem.dr.common on the lab hosts (testinfra, run by `molecule verify`).

Tests that take the `host` fixture run once per lab host (molecule passes the inventory).
The reachability tests run once and drive several hosts themselves: they start throw-away
TCP listeners (transient systemd units) on one host and connect to them from others.
"""

from __future__ import annotations

import re
import shlex
import time

import pytest
import testinfra

TABLE = "inet tandem_filter"
UNIT = "tandem-firewall.service"

# hv-b1's address on the site B replication network (10.202.120.0/24, allowed for 7788)
# and on its site LAN (10.202.20.0/24, not allowed for 7788).
TARGET = "hv-b1"
TARGET_REPL = "10.202.120.11"
TARGET_LAN = "10.202.20.11"
ALLOWED_PORT = 7788
BLOCKED_PORT = 7789

# A TCP server that accepts and closes connections until systemd stops it.
LISTENER = ("import socket, sys; s = socket.create_server(('0.0.0.0', int(sys.argv[1]))); "
            "any(s.accept()[0].close() for _ in iter(int, 1))")


def _table(host) -> str:
    return host.check_output(f"nft list table {TABLE}")


def test_firewall_unit_is_enabled_and_active(host):
    unit = host.service(UNIT)
    assert unit.is_enabled
    assert unit.is_running, host.run(f"journalctl -u {UNIT} -n 30 --no-pager").stdout


def test_table_is_loaded_with_input_policy_drop(host):
    table = _table(host)
    assert re.search(r"type filter hook input priority filter; policy drop;", table), table
    assert "hook forward" not in table and "hook output" not in table, table


def test_table_has_the_expected_rules(host):
    table = _table(host)
    assert re.search(r'iif "lo" accept', table), table
    assert re.search(r"tcp dport 22 accept", table), table
    assert re.search(
        r"ip saddr \{ 10\.202\.110\.0/24, 10\.202\.120\.0/24 \} tcp dport 7788 accept", table), table
    # IPv4 and IPv6 sources of one rule go to an `ip saddr` and an `ip6 saddr` rule.
    assert re.search(r"ip saddr 10\.202\.40\.0/24 .*vrrp accept", table), table
    assert re.search(r"ip6 saddr fe80::/10 .*vrrp accept", table), table


def test_rules_file_and_unit_file(host):
    rules = host.file("/etc/tandem/firewall.nft")
    assert rules.is_file and rules.user == "root" and rules.mode == 0o644
    assert host.file("/etc/tandem").mode == 0o755
    assert host.file("/etc/tandem/firewall.d").is_directory
    assert 'include "/etc/tandem/firewall.d/*.nft"' in rules.content_string
    assert host.run("nft -c -f /etc/tandem/firewall.nft").rc == 0
    unit = host.file("/etc/systemd/system/tandem-firewall.service").content_string
    assert "Type=oneshot" in unit and "RemainAfterExit=yes" in unit
    assert "ExecStart=/usr/sbin/nft -f /etc/tandem/firewall.nft" in unit


def test_journal_is_persistent_and_capped(host):
    journal = host.file("/var/log/journal")
    assert journal.is_directory
    assert journal.group == "systemd-journal"
    dropin = host.file("/etc/systemd/journald.conf.d/50-tandem.conf")
    assert dropin.is_file
    assert "Storage=persistent" in dropin.content_string
    assert "SystemMaxUse=512M" in dropin.content_string
    assert host.service("systemd-journald").is_running


def test_journal_events_land_on_disk(host):
    # An event logged now must be in the journal files under /var/log/journal (not only in
    # the volatile /run/log/journal), i.e. it would survive a reboot.
    marker = f"tandem-molecule-{time.time_ns()}"
    host.check_output(f"logger -t tandem-molecule {marker}")
    host.check_output("journalctl --sync")
    on_disk = host.check_output("journalctl -D /var/log/journal -t tandem-molecule -o cat -n 20")
    assert marker in on_disk


# --- reachability across lab hosts -----------------------------------------------------


@pytest.fixture(scope="module")
def lab_host(request):
    """Return a function that gives a testinfra host for a lab host name."""
    inventory = request.config.getoption("ansible_inventory")

    def get(name):
        return testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory)

    return get


def _connects(src, dst: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({dst!r}, {port}), timeout=3).close()"
    return src.run(f"python3 -c {shlex.quote(code)}").rc == 0


@pytest.fixture(scope="module")
def listeners(lab_host):
    """TCP listeners on TARGET: one on the allowed port, one on a port not allowed."""
    target = lab_host(TARGET)
    units = []
    for port in (ALLOWED_PORT, BLOCKED_PORT):
        unit = f"tandem-molecule-listen-{port}"
        target.run(f"systemctl stop {unit}")  # left over from an interrupted run
        target.check_output(
            f"systemd-run --unit {unit} --collect --property RuntimeMaxSec=300 "
            f"/usr/bin/python3 -c {shlex.quote(LISTENER)} {port}")
        units.append(unit)
    deadline = time.monotonic() + 15
    while not all(target.socket(f"tcp://0.0.0.0:{p}").is_listening
                  for p in (ALLOWED_PORT, BLOCKED_PORT)):
        assert time.monotonic() < deadline, "the test listeners did not come up"
        time.sleep(0.2)
    yield target
    for unit in units:
        target.run(f"systemctl stop {unit}")


def test_listeners_answer_locally(listeners):
    # Loopback is accepted: both listeners work, so a failure below is the firewall's.
    assert _connects(listeners, "127.0.0.1", ALLOWED_PORT)
    assert _connects(listeners, "127.0.0.1", BLOCKED_PORT)


def test_allowed_port_is_reachable_from_the_replication_network(listeners, lab_host):
    # hv-a1 reaches 10.202.120.0/24 through its replication NIC (source 10.202.110.11).
    assert _connects(lab_host("hv-a1"), TARGET_REPL, ALLOWED_PORT)


def test_port_not_allowed_is_blocked(listeners, lab_host):
    assert not _connects(lab_host("hv-a1"), TARGET_REPL, BLOCKED_PORT)
    assert not _connects(lab_host("cp-b"), TARGET_LAN, BLOCKED_PORT)


def test_allowed_port_is_blocked_from_other_sources(listeners, lab_host):
    # cp-a is on site A's LAN (10.202.10.0/24), not on a replication network.
    assert not _connects(lab_host("cp-a"), TARGET_LAN, ALLOWED_PORT)


def test_ssh_and_ping_still_work_between_hosts(lab_host):
    src = lab_host("cp-a")
    for dst in ("10.202.20.11", "10.202.20.21", "10.202.30.11", "10.202.10.11"):
        assert _connects(src, dst, 22), f"ssh port of {dst} not reachable from cp-a"
        assert src.run(f"ping -n -c 1 -W 2 {dst}").rc == 0, f"{dst} does not answer ping"
