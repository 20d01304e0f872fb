"""Verify tandem.dr.engine (with tandem.dr.common) on the two hypervisors of the lab.

Tests that take the `host` fixture run once per hypervisor. The cross-host tests open the
lab hosts themselves: the firewall tests start throw-away TCP listeners on hv-b1 and connect
from other hosts; the replication test runs a real resource between hv-a1 and hv-b1 over
mutual TLS with the certificates the role installed.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pytest
import testinfra

testinfra_hosts = ["hv-a1", "hv-b1"]

UNIT = "tandemd.service"
VENV = "/opt/tandem/venv"
SOCKET = "/run/tandem/tandemd.sock"
TLS = "/etc/tandem/tls"
DROPIN = "/etc/tandem/firewall.d/50-tandem-engine.nft"
PORTS = "7788-7899"

# Replication addresses (tandem_replication_address) and LAN addresses of the lab.
REPL = {"hv-a1": "10.202.110.11", "hv-b1": "10.202.120.11"}
LAN = {"hv-a1": "10.202.10.11", "hv-b1": "10.202.20.11"}
PEER = {"hv-a1": "hv-b1", "hv-b1": "hv-a1"}

# A TCP server that accepts and closes connections until systemd stops it.
LISTENER = ("import socket, sys; s = socket.create_server(('0.0.0.0', int(sys.argv[1]))); "
            "any(s.accept()[0].close() for _ in iter(int, 1))")


def _name(host) -> str:
    return host.check_output("hostname")


# --- installation and service ------------------------------------------------------------


def test_tandemd_is_enabled_and_running(host):
    unit = host.service(UNIT)
    assert unit.is_enabled
    assert unit.is_running, host.run(f"journalctl -u {UNIT} -n 30 --no-pager").stdout
    assert host.check_output(f"systemctl show {UNIT} -p NRestarts --value") == "0"
    # No upgrade left waiting for a restart (tandem_engine_restart_on_upgrade).
    assert not host.file("/opt/tandem/restart-pending").exists


def test_unit_runs_the_venv_with_the_default_directories(host):
    unit = host.file(f"/etc/systemd/system/{UNIT}").content_string
    assert (f"ExecStart={VENV}/bin/tandemd --config-dir /etc/tandem/resources.d "
            "--state-dir /var/lib/tandem --run-dir /run/tandem") in unit
    assert "Restart=on-failure" in unit
    assert "RuntimeDirectory=tandem" in unit
    # Block devices must stay reachable.
    assert not re.search(r"^(PrivateDevices|DevicePolicy)=", unit, re.M), unit


def test_engine_is_installed_from_the_wheel_into_the_venv(host):
    wheels = host.check_output("ls /opt/tandem/wheels").split()
    assert len(wheels) == 1 and re.fullmatch(r"tandem-[0-9.]+-py3-none-any\.whl", wheels[0]), wheels
    show = host.check_output(f"{VENV}/bin/python -m pip show tandem --disable-pip-version-check")
    assert "Name: tandem" in show
    for cmd in ("tandemd", "tandemctl"):
        link = host.file(f"/usr/local/bin/{cmd}")
        assert link.is_symlink and link.linked_to == f"{VENV}/bin/{cmd}"


def test_directories(host):
    assert host.file("/etc/tandem/resources.d").mode == 0o755
    assert host.file("/var/lib/tandem").mode == 0o700
    assert host.file("/etc/tandem/secrets").mode == 0o700


def test_control_socket_and_tandemctl(host):
    sock = host.file(SOCKET)
    assert sock.exists and sock.is_socket
    assert sock.mode == 0o600
    reply = json.loads(host.check_output("tandemctl status --json"))
    assert reply["ok"] is True
    assert isinstance(reply["resources"], list)


# --- TLS --------------------------------------------------------------------------------


def test_node_certificate_verifies_against_the_ca_bundle(host):
    out = host.check_output(f"openssl verify -CAfile {TLS}/ca.crt {TLS}/node.crt")
    assert out.endswith(": OK"), out


def test_ca_bundle_holds_the_ca_of_every_site(host):
    bundle = host.file(f"{TLS}/ca.crt").content_string
    assert bundle.count("-----BEGIN CERTIFICATE-----") == 2
    subjects = host.check_output(
        f"openssl crl2pkcs7 -nocrl -certfile {TLS}/ca.crt | openssl pkcs7 -print_certs -noout")
    assert "Tandem DR site a CA" in subjects and "Tandem DR site b CA" in subjects


def test_node_certificate_san_and_usages(host):
    name = _name(host)
    ext = host.check_output(
        f"openssl x509 -in {TLS}/node.crt -noout -ext subjectAltName,extendedKeyUsage,basicConstraints")
    assert re.search(rf"DNS:{re.escape(name)}\s*$", ext, re.M), ext
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in ext, ext
    assert "CA:TRUE" not in ext


def test_node_key_is_private_and_matches_the_certificate(host):
    key = host.file(f"{TLS}/node.key")
    assert key.user == "root" and key.mode == 0o600
    assert host.file(f"{TLS}/node.crt").mode == 0o644
    pub_cert = host.check_output(f"openssl x509 -in {TLS}/node.crt -noout -pubkey")
    pub_key = host.check_output(f"openssl pkey -in {TLS}/node.key -pubout")
    assert pub_cert == pub_key


def test_peer_certificate_verifies_against_this_nodes_bundle(host, lab_host):
    # The peer is at the other site, so its certificate chains to the other site's CA.
    peer_cert = lab_host(PEER[_name(host)]).file(f"{TLS}/node.crt").content_string
    out = host.check_output(
        f"printf %s {shlex.quote(peer_cert)} | openssl verify -CAfile {TLS}/ca.crt")
    assert out.endswith(": OK"), out


# --- firewall ---------------------------------------------------------------------------


def test_dropin_opens_the_port_range_to_the_peer_only(host):
    name = _name(host)
    dropin = host.file(DROPIN).content_string
    rules = [line for line in dropin.splitlines() if line and not line.startswith("#")]
    peer = REPL[PEER[name]]
    assert rules == [f'ip saddr {peer} tcp dport {PORTS} accept comment "tandemd replication"'], rules
    table = host.check_output("nft list table inet tandem_filter")
    assert re.search(rf"ip saddr {re.escape(REPL[PEER[name]])} tcp dport {PORTS} accept", table), table
    # Nothing else accepts the replication ports.
    assert len(re.findall(r"dport 7788", table)) == 1, table


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
def listener(lab_host):
    """A TCP listener on hv-b1, inside the replication port range."""
    target, port = lab_host("hv-b1"), 7890
    unit = f"tandem-molecule-listen-{port}"
    target.run(f"systemctl stop {unit}")
    target.check_output(f"systemd-run --unit {unit} --collect --property RuntimeMaxSec=300 "
                        f"/usr/bin/python3 -c {shlex.quote(LISTENER)} {port}")
    deadline = time.monotonic() + 15
    while not target.socket(f"tcp://0.0.0.0:{port}").is_listening:
        assert time.monotonic() < deadline, "the test listener did not come up"
        time.sleep(0.2)
    yield target, port
    target.run(f"systemctl stop {unit}")


def test_replication_port_open_from_the_peer_replication_address(listener, lab_host):
    port = listener[1]
    # hv-a1 reaches 10.202.120.0/24 through its replication NIC (source 10.202.110.11).
    assert _connects(lab_host("hv-a1"), REPL["hv-b1"], port)


def test_replication_port_closed_to_other_sources(listener, lab_host):
    target, port = listener
    assert _connects(target, "127.0.0.1", port)  # the listener works
    # hv-a1 from its LAN address, and a control-plane host of the same site.
    assert not _connects(lab_host("hv-a1"), LAN["hv-b1"], port)
    assert not _connects(lab_host("cp-b"), LAN["hv-b1"], port)


# --- a real resource over mutual TLS ------------------------------------------------------

E2E = "molecule-e2e"
E2E_PORT = 7791
E2E_SECRET = "molecule-e2e-secret-0123456789abcdef"


def _e2e_toml(local: str) -> str:
    return f"""resource = "{E2E}"
protocol = "C"
local_node = "{local}"

[[nodes]]
name = "hv-a1"
address = "{REPL['hv-a1']}:{E2E_PORT}"

[[nodes]]
name = "hv-b1"
address = "{REPL['hv-b1']}:{E2E_PORT}"

[[volumes]]
number = 0
path = "/var/lib/tandem/{E2E}/disk0.img"
size = "16MiB"
"""


def _e2e_status(h) -> dict:
    reply = json.loads(h.check_output("tandemctl status --json"))
    return next((r for r in reply.get("resources", []) if r.get("name") == E2E), {})


@pytest.fixture(scope="module")
def e2e_resource(lab_host):
    """The resource molecule-e2e on both hypervisors, with the role's TLS files."""
    hosts = {name: lab_host(name) for name in ("hv-a1", "hv-b1")}
    for name, h in hosts.items():
        h.check_output(f"install -d -m 0700 /var/lib/tandem/{E2E}")
        h.check_output(f"printf %s {shlex.quote(E2E_SECRET)} > /etc/tandem/secrets/{E2E}.key && "
                       f"chmod 0600 /etc/tandem/secrets/{E2E}.key")
        h.check_output(f"printf %s {shlex.quote(_e2e_toml(name))} > /etc/tandem/resources.d/{E2E}.toml")
        h.check_output(f"tandemctl adjust {E2E}")
    yield hosts
    for h in hosts.values():
        h.run(f"rm -f /etc/tandem/resources.d/{E2E}.toml")
        h.run(f"tandemctl adjust {E2E}")
        h.run(f"rm -rf /var/lib/tandem/{E2E} /etc/tandem/secrets/{E2E}.key")


def test_resource_connects_over_mutual_tls(e2e_resource):
    deadline = time.monotonic() + 60
    while True:
        states = {name: _e2e_status(h).get("connection") for name, h in e2e_resource.items()}
        if all(s == "Connected" for s in states.values()):
            break
        if time.monotonic() > deadline:
            logs = {name: h.run(f"journalctl -u {UNIT} -n 20 --no-pager").stdout
                    for name, h in e2e_resource.items()}
            pytest.fail(f"not connected after 60 s: {states}\n{logs}")
        time.sleep(1)
    assert _e2e_status(e2e_resource["hv-a1"])["peer"] == "hv-b1"


# --- the resource of converge.yml (tandem_engine_resources), once the module exists -------

ROLE_RESOURCE = "molecule-role"
HAS_RESOURCE_MODULE = (Path(__file__).resolve().parents[3] / "plugins" / "modules"
                       / "tandem_resource.py").is_file()
needs_resource_module = pytest.mark.skipif(
    not HAS_RESOURCE_MODULE, reason="tandem.dr.tandem_resource is not in the collection yet")


@needs_resource_module
def test_role_resource_file_and_secret(host):
    name = _name(host)
    toml = host.file(f"/etc/tandem/resources.d/{ROLE_RESOURCE}.toml")
    assert toml.is_file
    assert re.search(rf'^local_node = "{re.escape(name)}"$', toml.content_string, re.M), toml.content_string
    secret = host.file(f"/etc/tandem/secrets/{ROLE_RESOURCE}.key")
    assert secret.is_file and secret.mode == 0o600


@needs_resource_module
def test_role_resource_connects(host):
    deadline = time.monotonic() + 60
    while True:
        reply = json.loads(host.check_output("tandemctl status --json"))
        res = next((r for r in reply["resources"] if r.get("name") == ROLE_RESOURCE), {})
        if res.get("connection") == "Connected":
            break
        assert time.monotonic() < deadline, f"{ROLE_RESOURCE} not connected after 60 s: {res}"
        time.sleep(1)
