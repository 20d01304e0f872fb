"""Fault injection: every fault does what it says, shows in status, and heals."""

from __future__ import annotations

import json
import re
import socket
import subprocess

HV_A1, HV_B1 = "10.202.10.11", "10.202.20.11"
CP_A, CP_B = "10.202.10.21", "10.202.20.21"
HV_A1_REPL, HV_B1_REPL = "10.202.110.11", "10.202.120.11"
CP_A_SEG, CP_B_SEG = "10.202.40.11", "10.202.40.12"
WITNESS = "10.202.30.11"


def reachable_from_here(address: str, port: int = 22) -> bool:
    try:
        socket.create_connection((address, port), timeout=2).close()
        return True
    except OSError:
        return False


def faults(lab):
    return lab.status()["faults"]


def test_partition_blocks_the_sites_and_heal_restores(healed):
    lab = healed
    assert lab.pings("hv-a1", HV_B1) and lab.pings("hv-b1", HV_A1)

    lab.labctl("partition", "a", "b")
    assert {"fault": "partition", "sites": ["a", "b"]} in faults(lab)
    # hv-a1 <-> hv-b1 is cut, on the LAN and on the replication network ...
    assert not lab.pings("hv-a1", HV_B1)
    assert not lab.pings("hv-b1", HV_A1)
    assert not lab.tcp("hv-a1", HV_B1)
    assert not lab.pings("hv-a1", HV_B1_REPL)
    # ... and on the shared control-plane segment (L2, not routed).
    assert not lab.pings("cp-a", CP_B_SEG)
    # Each site still reaches its own hosts, and the witness site.
    assert lab.pings("hv-a1", CP_A) and lab.tcp("hv-a1", CP_A)
    assert lab.pings("hv-b1", CP_B) and lab.tcp("hv-b1", CP_B)
    assert lab.pings("hv-a1", WITNESS) and lab.pings("hv-b1", WITNESS)
    # A second partition of the same pair is a no-op, not a duplicate rule.
    lab.labctl("partition", "b", "a")
    assert sum(f["fault"] == "partition" for f in faults(lab)) == 1

    lab.labctl("heal", "a", "b")
    assert faults(lab) == []
    assert lab.pings("hv-a1", HV_B1) and lab.pings("hv-b1", HV_A1)
    assert lab.tcp("hv-a1", HV_B1) and lab.pings("cp-a", CP_B_SEG)
    assert lab.pings("hv-a1", HV_B1_REPL)


def test_isolate_cuts_one_host_off_everything(healed):
    lab = healed
    lab.labctl("isolate", "cp-b")
    assert {"fault": "isolate", "host": "cp-b"} in faults(lab)
    assert not lab.pings("hv-b1", CP_B)           # same site
    assert not lab.pings("cp-a", CP_B_SEG)        # the VIP segment
    assert not reachable_from_here(CP_B)          # the lab machine too
    assert lab.pings("hv-b1", HV_A1)              # everyone else is fine
    lab.labctl("heal", "cp-b")
    assert lab.pings("hv-b1", CP_B) and lab.pings("cp-a", CP_B_SEG)
    assert reachable_from_here(CP_B)


def test_packet_loss_between_sites(healed):
    lab = healed
    lab.labctl("loss", "a", "b", "30")
    assert {"fault": "loss", "sites": ["a", "b"], "percent": 30} in faults(lab)
    proc = lab.attach("hv-a1", "ping", "-n", "-q", "-c", "200", "-i", "0.01", "-W", "1", HV_B1)
    lost = float(re.search(r"([\d.]+)% packet loss", proc.stdout).group(1))
    # Each echo crosses the rule twice: expected loss 1 - 0.7**2 = 51%.
    # 200 samples put the 1-in-10^6 bounds well inside 25..80.
    assert 25 <= lost <= 80, proc.stdout
    # Loss applies between sites only.
    proc = lab.attach("hv-a1", "ping", "-n", "-q", "-c", "50", "-i", "0.01", "-W", "1", CP_A)
    assert " 0% packet loss" in proc.stdout
    lab.labctl("heal")
    assert faults(lab) == []


def test_rate_limit_shapes_inter_site_traffic_only(healed):
    lab = healed
    lab.labctl("ratelimit", "a", "b", "64kbit")
    assert {"fault": "ratelimit", "sites": ["a", "b"], "rate": "64kbit"} in faults(lab)
    # ~1.1 Mbit/s of pings into a 64 kbit/s bucket must hit the shaper.
    lab.attach("hv-a1", "ping", "-n", "-q", "-c", "100", "-i", "0.01", "-s", "1400", "-W", "1", HV_B1)
    stats = json.loads(subprocess.run(["tc", "-s", "-j", "qdisc", "show", "dev", "hv-b1-0"],
                                      capture_output=True, text=True, check=True).stdout)
    tbf = [q for q in stats if q["kind"] == "tbf"]
    assert tbf and tbf[0]["packets"] > 0, stats
    assert tbf[0]["overlimits"] > 0 or tbf[0]["drops"] > 0, tbf
    # Traffic from the lab machine itself (Ansible) is not shaped.
    assert lab.ansible("hv-b1", "-m", "ansible.builtin.ping", "-o").returncode == 0
    lab.labctl("heal", "a", "b")
    assert faults(lab) == []
    out = subprocess.run(["tc", "qdisc", "show", "dev", "hv-b1-0"], capture_output=True, text=True)
    assert "tbf" not in out.stdout


def test_crash_and_start_a_host(healed):
    lab = healed
    started = lab.attach("cp-b", "stat", "-c", "%Z", "/proc/1").stdout
    lab.labctl("crash", "cp-b")
    assert {"fault": "crashed", "host": "cp-b"} in faults(lab)
    assert not lab.pings("hv-b1", CP_B)
    lab.labctl("start", "cp-b")
    assert faults(lab) == []
    assert lab.ansible("cp-b", "-m", "ansible.builtin.ping", "-o").returncode == 0
    # It really went down: systemd started afresh (a new PID 1).
    assert lab.attach("cp-b", "stat", "-c", "%Z", "/proc/1").stdout != started
    assert lab.attach("cp-b", "systemctl", "is-system-running").stdout.strip() == "running"


def test_freeze_hangs_a_host_and_thaw_resumes_it(healed):
    lab = healed
    lab.labctl("freeze", "witness")
    assert {"fault": "frozen", "host": "witness"} in faults(lab)
    # Its processes are stopped: sshd never answers ...
    ansible = lab.ansible("witness", "-m", "ansible.builtin.ping", "-o",
                          "-e", "ansible_ssh_timeout=3", timeout=60)
    assert ansible.returncode != 0
    # ... while its kernel still answers ping, like a hung VM.
    assert lab.pings("hv-a1", WITNESS)
    lab.labctl("thaw", "witness")
    assert faults(lab) == []
    assert lab.ansible("witness", "-m", "ansible.builtin.ping", "-o").returncode == 0


def test_restart_reboots_a_host(healed):
    lab = healed
    boot = lab.attach("hv-b1", "stat", "-c", "%Z", "/proc/1").stdout
    lab.labctl("restart", "hv-b1")
    assert lab.attach("hv-b1", "stat", "-c", "%Z", "/proc/1").stdout != boot
    assert lab.pings("hv-a1", HV_B1_REPL)
