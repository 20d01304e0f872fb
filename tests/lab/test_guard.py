"""The egress guard: lab traffic never leaves the machine, VRRP still works."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time

import pytest

OUTSIDE_NS = "tdr-test-outside"
# An "outside" destination on a namespace this test makes on this machine,
# in a range no route of the machine uses (the machine's own uplink may sit
# in any private or documentation range, so pick one that is free).
CANDIDATES = ("10.203.254.0/24", "172.31.254.0/24", "198.51.100.0/24", "203.0.113.0/24")


# A minimal HTTP responder (http.server would try a reverse DNS lookup).
SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n")
    c.close()
"""


def free_range() -> ipaddress.IPv4Network:
    used = []
    for line in sh("ip", "-4", "-o", "addr").stdout.splitlines():
        used.append(ipaddress.IPv4Interface(line.split()[3]).network)
    for line in sh("ip", "-4", "route").stdout.splitlines():
        dest = line.split()[0]
        if dest != "default":
            used.append(ipaddress.IPv4Network(dest, strict=False))
    for candidate in map(ipaddress.IPv4Network, CANDIDATES):
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    pytest.skip("no free address range for the outside namespace")


def sh(*argv, check=True):
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def guard_drops() -> int:
    data = json.loads(sh("nft", "-j", "list", "chain", "inet", "tandem-lab-guard", "forward").stdout)
    for item in data["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") == "no egress from the lab":
            return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError("the egress rule is missing from the guard")


@pytest.fixture
def outside():
    net = free_range()
    gw, ip = str(net.network_address + 1), str(net.network_address + 2)
    sh("ip", "netns", "add", OUTSIDE_NS)
    try:
        sh("ip", "link", "add", "tdr-out0", "type", "veth", "peer", "name", "eth0",
           "netns", OUTSIDE_NS)
        sh("ip", "addr", "add", f"{gw}/24", "dev", "tdr-out0")
        sh("ip", "link", "set", "tdr-out0", "up")
        ns = ("ip", "netns", "exec", OUTSIDE_NS)
        sh(*ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        sh(*ns, "ip", "link", "set", "eth0", "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        # A route back to the lab only: nothing in here can reach beyond the
        # lab machine, whatever it tries (no default route, no DNS).
        sh(*ns, "ip", "route", "add", "10.202.0.0/16", "via", gw)
        server = subprocess.Popen([*ns, sys.executable, "-c", SERVER, ip, "8080"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield net, ip
        finally:
            server.kill()
            server.wait()
    finally:
        sh("ip", "link", "del", "tdr-out0", check=False)
        sh("ip", "netns", "del", OUTSIDE_NS, check=False)


def test_lab_hosts_cannot_reach_outside_even_with_a_route(lab, outside):
    net, ip = outside
    # Positive control: the outside namespace answers the lab machine itself.
    deadline = time.monotonic() + 10
    while sh("curl", "-s", "-o", "/dev/null", "-m", "2", f"http://{ip}:8080/",
             check=False).returncode != 0:
        assert time.monotonic() < deadline, "the outside test server never came up"
        time.sleep(0.2)
    before = guard_drops()
    lab.attach("hv-a1", "ip", "route", "add", str(net), "via", "10.202.10.1")
    try:
        assert not lab.tcp("hv-a1", ip, 8080)
    finally:
        lab.attach("hv-a1", "ip", "route", "del", str(net))
    assert guard_drops() > before


def test_lab_hosts_cannot_open_connections_to_the_lab_machine(lab):
    # A service on the lab machine, bound to its address on the site A bridge.
    server = subprocess.Popen([sys.executable, "-c", SERVER, "10.202.10.1", "8089"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while sh("curl", "-s", "-o", "/dev/null", "-m", "2", "http://10.202.10.1:8089/",
                 check=False).returncode != 0:
            assert time.monotonic() < deadline, "the test server never came up"
            time.sleep(0.2)
        assert not lab.tcp("hv-a1", "10.202.10.1", 8089)
        assert lab.pings("hv-a1", "10.202.10.1")   # ICMP to the router is allowed
    finally:
        server.kill()
        server.wait()


SENDER = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("10.202.40.11"))
for _ in range(20):
    s.sendto(b"vrrp-like", ("224.0.0.18", 5555))
"""

LISTENER = """
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5555))
group = struct.pack("4s4s", socket.inet_aton("224.0.0.18"), socket.inet_aton("10.202.40.12"))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
s.settimeout(10)
print(s.recvfrom(64)[0].decode())
"""


def test_multicast_inside_a_bridge_passes_the_guard(lab):
    # VRRP adverts go to 224.0.0.18; the guard must not drop multicast on a
    # bridge (br_netfilter makes the forward chain see bridged frames).
    listener = subprocess.Popen(
        ["lxc-attach", "-P", str(lab.state / "lxc"), "-n", "cp-b", "--clear-env", "--",
         "python3", "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    lab.attach("cp-a", "python3", "-c", SENDER)
    out, _ = listener.communicate(timeout=20)
    assert "vrrp-like" in out
