"""The lab itself: hosts, Ansible reachability, isolation from the world."""

from __future__ import annotations

import re

HOSTS = ("hv-a1", "cp-a", "hv-b1", "cp-b", "witness")


def test_up_is_idempotent(lab):
    # A second `up` on a running lab must not recreate or restart anything.
    before = {h: lab.attach(h, "cat", "/proc/1/stat").stdout.split()[21] for h in HOSTS}
    result = lab.labctl("up")
    assert '"created": []' in result.stdout
    after = {h: lab.attach(h, "cat", "/proc/1/stat").stdout.split()[21] for h in HOSTS}
    assert before == after, "a host's init was restarted by a second `up`"


def test_every_host_runs_systemd_with_no_failed_unit(lab):
    status = lab.status()
    assert set(status["hosts"]) == set(HOSTS)
    for host in HOSTS:
        assert status["hosts"][host]["state"] == "RUNNING"
        assert lab.attach(host, "systemctl", "is-system-running").stdout.strip() == "running"
        assert lab.attach(host, "readlink", "/proc/1/exe").stdout.strip().endswith("systemd")


def test_ansible_ping_reaches_all_five_hosts(lab):
    proc = lab.ansible("all", "-m", "ansible.builtin.ping", "-o")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ok_hosts = set(re.findall(r"^(\S+) \| SUCCESS", proc.stdout, re.M))
    assert ok_hosts == set(HOSTS)


def test_inventory_groups(lab):
    proc = lab.ansible("localhost", "-m", "ansible.builtin.debug",
                       "-a", "var=groups", "-o")
    assert proc.returncode == 0, proc.stderr
    assert "same name" not in proc.stderr, proc.stderr     # a group named like a host
    out = proc.stdout
    expected = {
        "site_a": ["hv-a1", "cp-a"], "site_b": ["hv-b1", "cp-b"], "site_c": ["witness"],
        "hypervisors": ["hv-a1", "hv-b1"], "control_plane": ["cp-a", "cp-b", "witness"],
    }
    for group, members in expected.items():
        listed = re.search(rf'"{group}": \[([^\]]*)\]', out)
        assert listed, f"group {group} missing from the inventory"
        assert sorted(re.findall(r'"([^"]+)"', listed.group(1))) == sorted(members)


def test_each_host_has_its_own_identity(lab):
    keys = {h: lab.attach(h, "cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[1]
            for h in HOSTS}
    assert len(set(keys.values())) == len(HOSTS)
    machine_ids = {h: lab.attach(h, "cat", "/etc/machine-id").stdout.strip() for h in HOSTS}
    assert all(len(m) == 32 for m in machine_ids.values()), machine_ids
    assert len(set(machine_ids.values())) == len(HOSTS)


def test_no_dns_and_no_route_out(lab):
    for host in HOSTS:
        resolv = lab.attach(host, "cat", "/etc/resolv.conf").stdout
        assert "nameserver" not in resolv
        routes = lab.attach(host, "ip", "route", "show", "default").stdout
        assert routes.strip() == "", f"{host} has a default route: {routes}"
    # Names of other hosts come from /etc/hosts.
    assert lab.attach("hv-a1", "getent", "hosts", "hv-b1").stdout.split()[0] == "10.202.20.11"


def test_sites_are_routed_and_the_replication_network_is_separate(lab):
    assert lab.pings("hv-a1", "10.202.20.11")          # site LAN to site LAN, via the router
    assert lab.pings("hv-a1", "10.202.120.11")         # replication network
    route = lab.attach("hv-a1", "ip", "route", "get", "10.202.120.11").stdout
    assert "dev eth1" in route and "src 10.202.110.11" in route
    assert lab.pings("cp-a", "10.202.40.12")           # the control-plane VIP segment
    assert lab.pings("witness", "10.202.10.21")


def test_hypervisors_can_run_qemu_guests(lab):
    for host in ("hv-a1", "hv-b1"):
        # libvirtd is socket-activated: the first virsh call starts it.
        caps = lab.attach(host, "virsh", "-c", "qemu:///system", "capabilities").stdout
        assert "<domain type='qemu'" in caps
        assert lab.attach(host, "systemctl", "is-active", "libvirtd").stdout.strip() == "active"
        # A tap NIC on a bridge, which is what a guest NIC is.
        script = ("set -e; ip link add tbr0 type bridge; ip tuntap add tap-t0 mode tap;"
                  " ip link set tap-t0 master tbr0; ip link set tap-t0 up;"
                  " ip -o link show tap-t0; ip link del tap-t0; ip link del tbr0")
        proc = lab.attach(host, "sh", "-c", script)
        assert proc.returncode == 0 and "master tbr0" in proc.stdout, proc.stderr
        assert lab.attach(host, "findmnt", "-n", "/srv/tandem").returncode == 0
        assert lab.attach(host, "qemu-system-x86_64", "--version").returncode == 0


def test_control_plane_packages_are_baked_in(lab):
    for binary in ("pg_autoctl", "keepalived", "psql"):
        found = f"command -v {binary} || ls /usr/lib/postgresql/15/bin/{binary}"
        proc = lab.attach("cp-a", "sh", "-c", found)
        assert proc.returncode == 0, f"{binary} is missing from the image"
    assert lab.attach("cp-a", "python3", "-c", "import psycopg").returncode == 0
