"""Verify tandem.dr.control_plane on the trio (testinfra, run by `molecule verify`).

Per-host tests take the `host` fixture (molecule's inventory holds all five lab hosts, so
they skip hosts outside the trio). The trio tests open cp-a, cp-b and witness themselves
and check the whole: one writable primary holding the VIP, a streaming synchronous standby,
and a monitor that sees both keepers.
"""

from __future__ import annotations

import json
import shlex
import time

import pytest
import testinfra

DATA = ("cp-a", "cp-b")
WITNESS = "witness"
VIP = "10.202.40.100"
UNIT = "tandem-pgautofailover.service"
PSQL = "runuser -u postgres -- psql -h /var/run/postgresql -XAt"
AUTOCTL = ("runuser -u postgres -- env -i HOME=/var/lib/postgresql XDG_RUNTIME_DIR=/var/run/postgresql "
           "PATH=/usr/lib/postgresql/15/bin:/usr/bin:/bin pg_autoctl")
APP_DSN = (f"host={VIP} dbname=tandem user=tandem password=molecule-app-secret sslmode=require "
           "connect_timeout=5")


@pytest.fixture(scope="module")
def trio(request):
    inventory = request.config.getoption("ansible_inventory")
    return {name: testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory)
            for name in (*DATA, WITNESS)}


@pytest.fixture(scope="module")
def clients(request):
    """hv-a1 (in the declared client network 10.202.10.0/24) and hv-b1 (in no allowed
    network). Used only for TCP connect attempts: nothing is changed on them."""
    inventory = request.config.getoption("ansible_inventory")
    return {name: testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory)
            for name in ("hv-a1", "hv-b1")}


def _connects(src, address: str, port: int) -> bool:
    """True if `src` can open a TCP connection to address:port (a dropped SYN times out)."""
    code = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()"
    return src.run(f"python3 -c {shlex.quote(code)} {address} {port}").rc == 0


def _sql(host, query: str, db: str = "postgres") -> str:
    return host.check_output(f"{PSQL} -d {db} -c {shlex.quote(query)}")


def _holds_vip(host) -> bool:
    return f" {VIP}/" in host.check_output("ip -o -4 addr show")


def _writable(host) -> bool:
    query = "select (not pg_is_in_recovery()) and current_setting('transaction_read_only') = 'off'"
    return host.run(f"{PSQL} -d postgres -c {shlex.quote(query)}").stdout.strip() == "t"


def _formation(witness) -> list[dict]:
    out = witness.check_output(
        f"{AUTOCTL} show state --pgdata /var/lib/postgresql/15/tandem-monitor --json")
    return json.loads(out)


def _primary_and_standby(trio):
    writable = [name for name in DATA if _writable(trio[name])]
    assert len(writable) == 1, f"writable data nodes: {writable}"
    primary = writable[0]
    return primary, next(name for name in DATA if name != primary)


# --- per host --------------------------------------------------------------------------


def test_units_are_enabled_and_running(host):
    name = host.backend.get_hostname()
    if name not in (*DATA, WITNESS):
        pytest.skip("not in the control-plane trio")
    units = [UNIT] + (["keepalived.service", "tandem-cp-watch.service"] if name in DATA else [])
    for unit in units:
        service = host.service(unit)
        assert service.is_enabled, unit
        assert service.is_running, host.run(f"journalctl -u {unit} -n 30 --no-pager").stdout
    # The Debian default cluster is out of the way.
    assert not host.service("postgresql@15-main").is_running


def test_postgresql_settings_and_tls(host):
    name = host.backend.get_hostname()
    if name not in DATA:
        pytest.skip("not a data node")
    assert _sql(host, "show wal_sender_timeout") == "5s"
    assert _sql(host, "show wal_receiver_timeout") == "5s"
    assert _sql(host, "show ssl") == "on"
    npt = host.check_output(f"{AUTOCTL} config get --pgdata /var/lib/postgresql/15/tandem "
                            "timeout.network_partition_timeout")
    assert npt.strip() == "5"
    pgpass = host.file("/var/lib/postgresql/.pgpass")
    assert pgpass.user == "postgres" and pgpass.mode == 0o600


def test_monitor_timeouts(host):
    if host.backend.get_hostname() != WITNESS:
        pytest.skip("not the witness")
    rows = dict(line.split("=", 1) for line in _sql(host, (
        "select name || '=' || setting from pg_settings where name like 'pgautofailover.%'"
    )).splitlines())
    assert rows["pgautofailover.node_considered_unhealthy_timeout"] == "4000"
    assert rows["pgautofailover.primary_demote_timeout"] == "10000"
    assert rows["pgautofailover.health_check_period"] == "1000"
    hba = host.file("/var/lib/postgresql/15/tandem-monitor/pg_hba.conf").content_string
    assert "10.202.30.0/24" not in hba  # pg_autoctl's LAN-wide autoctl_node rule is gone
    assert "autoctl_node 10.202.10.21/32 scram-sha-256" in hba


# --- the trio ----------------------------------------------------------------------------


def test_exactly_one_writable_node_and_it_holds_the_vip(trio):
    primary, standby = _primary_and_standby(trio)
    deadline = time.monotonic() + 15  # keepalived's check runs every second
    while not (_holds_vip(trio[primary]) and not _holds_vip(trio[standby])):
        assert time.monotonic() < deadline, (
            f"VIP on {primary}: {_holds_vip(trio[primary])}, on {standby}: {_holds_vip(trio[standby])}")
        time.sleep(0.5)


def test_standby_is_a_streaming_synchronous_standby(trio):
    primary, standby = _primary_and_standby(trio)
    assert _sql(trio[standby], "select pg_is_in_recovery()") == "t"
    rows = _sql(trio[primary], "select state, sync_state from pg_stat_replication").splitlines()
    # pg_auto_failover names the standby in `ANY 1 (...)`: sync_state is `quorum` (RPO 0).
    assert rows in (["streaming|quorum"], ["streaming|sync"]), rows
    assert _sql(trio[primary], "show synchronous_standby_names").startswith("ANY 1 (")
    assert _sql(trio[primary], "show synchronous_commit") == "on"
    assert _sql(trio[standby], "select status from pg_stat_wal_receiver") == "streaming"


def test_monitor_sees_both_keepers(trio):
    nodes = _formation(trio[WITNESS])
    assert sorted(n["nodename"] for n in nodes) == sorted(DATA)
    assert all(n["health"] == 1 for n in nodes), nodes
    states = sorted((n["current_group_state"], n["assigned_group_state"]) for n in nodes)
    assert states == [("primary", "primary"), ("secondary", "secondary")], nodes
    primary = _primary_and_standby(trio)[0]
    assert next(n for n in nodes if n["current_group_state"] == "primary")["nodename"] == primary


def test_application_writes_through_the_vip_are_on_the_standby(trio):
    primary, standby = _primary_and_standby(trio)
    marker = f"molecule-{time.time_ns()}"
    code = (
        "import psycopg, sys\n"
        "with psycopg.connect(sys.argv[1], autocommit=True) as c:\n"
        "    c.execute('create table if not exists molecule_probe (v text)')\n"
        "    c.execute('insert into molecule_probe values (%s)', (sys.argv[2],))\n"
        "    print(c.execute('select inet_server_addr()').fetchone()[0])\n")
    out = trio[standby].check_output(
        f"python3 -c {shlex.quote(code)} {shlex.quote(APP_DSN)} {marker}")
    assert out.strip() == VIP
    deadline = time.monotonic() + 10
    while _sql(trio[standby], f"select count(*) from molecule_probe where v = '{marker}'", "tandem") != "1":
        assert time.monotonic() < deadline, "the committed row never showed up on the standby"
        time.sleep(0.3)
    # fails on the standby: it is read-only
    assert trio[standby].run(f"{PSQL} -d tandem -c 'insert into molecule_probe values (1)'").rc != 0


def test_hba_rejects_clients_outside_the_declared_networks(trio):
    # The witness's site LAN (10.202.30.0/24) is neither the VIP network nor a client network.
    code = ("import psycopg, sys\n"
            "try:\n"
            "    psycopg.connect(sys.argv[1]).close()\n"
            "except psycopg.OperationalError as e:\n"
            "    print(e)\n"
            "    sys.exit(3)\n")
    result = trio[WITNESS].run(f"python3 -c {shlex.quote(code)} {shlex.quote(APP_DSN)}")
    assert result.rc == 3 and "no pg_hba.conf entry" in result.stdout, result.stdout + result.stderr


def test_transitions_are_in_the_journal(trio):
    primary = _primary_and_standby(trio)[0]
    vip = trio[primary].check_output("journalctl -t tandem-cp-vip -o cat --no-pager")
    assert "vip_state=MASTER" in vip
    watch = trio[primary].check_output("journalctl -t tandem-cp-watch -o cat --no-pager")
    assert "role=primary writable=yes" in watch


# --- firewall (tandem.dr.common's table with the role's drop-in) ---------------------------


def test_firewall_drop_in_is_loaded(trio):
    for name, host in trio.items():
        ruleset = host.check_output("nft list chain inet tandem_filter input")
        if name == WITNESS:
            assert 'tcp dport 5432 accept comment "pg_auto_failover monitor"' in ruleset, ruleset
            assert "l4proto 112" not in ruleset
        else:
            peer = "10.202.40.12" if name == "cp-a" else "10.202.40.11"
            # nft prints IP protocol 112 by its /etc/protocols name.
            vrrp = [line.strip() for line in ruleset.splitlines() if "control-plane VRRP" in line]
            assert vrrp in ([f'ip saddr {peer} meta l4proto {proto} accept comment "control-plane VRRP"']
                            for proto in ("vrrp", "112")), ruleset
            assert 'tcp dport 5432 accept comment "control-plane PostgreSQL"' in ruleset, ruleset


def test_firewall_postgresql_only_from_the_trio_vip_and_client_networks(trio, clients):
    # Allowed: a declared client network (hv-a1), the trio (witness -> data node).
    assert _connects(clients["hv-a1"], VIP, 5432)
    assert _connects(trio[WITNESS], VIP, 5432)
    assert _connects(trio[WITNESS], "10.202.20.21", 5432)
    # Not allowed: hv-b1's network is neither the VIP network nor a client network.
    assert not _connects(clients["hv-b1"], VIP, 5432)
    assert not _connects(clients["hv-b1"], "10.202.10.21", 5432)
    # ssh stays open (tandem.dr.common), so the drop is the firewall, not a dead host.
    assert _connects(clients["hv-b1"], "10.202.10.21", 22)


def test_firewall_monitor_only_from_the_keepers(trio, clients):
    assert _connects(trio["cp-a"], "10.202.30.11", 5432)
    assert _connects(trio["cp-b"], "10.202.30.11", 5432)
    assert not _connects(clients["hv-a1"], "10.202.30.11", 5432)
    assert _connects(clients["hv-a1"], "10.202.30.11", 22)
