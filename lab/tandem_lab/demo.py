"""`make demo`: the whole Tandem DR story on the lab, one step after the other, with
progress and a final report (docs/demo.md).

1. the lab is up (make lab-up did it); the lab guest image is built and pushed
2. the control-plane trio and tandem-center, then tandemd, then the engines are enrolled with
   the center (it follows them: dashboard, alerts, RP schedules)
3. the two lab VMs are protected (and registered in the center's catalogue)
4. a non-intrusive drill
5. a planned failover, then a failback
6. site A crashes (hv-a1), and an unplanned failover
7. the report: achieved RPO (durable records lost), RTO per VM, the drill's result

The playbooks run from the collection as a user installs it: the tarball that
`ansible-galaxy collection build` makes, installed into .cache/demo-collections and called by
name (`ansible-playbook tandem.dr.protect`). TANDEM_DEMO_FROM=checkout runs them from
playbooks/ in the checkout instead.

Secrets for the trio are generated once into inventories/lab/tandem-secrets/ (git-ignored).
Everything is left running for a look around; `make demo-down` removes the lab.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "inventories" / "lab"
RUNS = LAB / "tandem-runs"
LABCTL = REPO / "lab" / "labctl"
VMS = {"app01": ("192.168.10.11", "192.168.20.11"), "app02": ("192.168.10.12", "192.168.20.12")}
FILES = ["-e", f"tandem_protection_group_file={LAB / 'protection_group.yml'}",
         "-e", f"tandem_network_mapping_file={LAB / 'network_mapping.yml'}",
         "-e", f"tandem_recovery_plan_file={LAB / 'recovery_plan.yml'}",
         "-e", f"tandem_runs_dir={RUNS}"]
# tandem-center's URL, token and CA, and the engines' monitor endpoint (inventories/lab/center.yml).
CENTER = ["-e", f"@{LAB / 'center.yml'}"]
DASHBOARD = "https://10.202.40.100:8443/"
INSTALLED = REPO / ".cache" / "demo-collections"
#: The collections tandem.dr needs (ci/collections.sh); the installed tandem.dr comes first.
DEPENDENCIES = REPO / ".cache" / "collections"
FROM_CHECKOUT = os.environ.get("TANDEM_DEMO_FROM", "installed") == "checkout"
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[demo {time.monotonic() - T0:6.0f}s] {text}", flush=True)


def ansible_env() -> dict[str, str]:
    # Without the checkout on PYTHONPATH, so nothing of tandem.dr is found but the installed copy.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    paths = [DEPENDENCIES] if FROM_CHECKOUT else [INSTALLED, DEPENDENCIES]
    return {**env, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_COLLECTIONS_PATH": os.pathsep.join(map(str, paths))}


def run(argv: list[str], what: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    t = time.monotonic()
    say(f"{what} ...")
    env = ansible_env()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    log = RUNS / "demo.log"
    with log.open("a") as f:
        f.write(f"\n### {what}\n$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
    if check and proc.returncode != 0:
        say(f"{what}: FAILED (rc {proc.returncode}); the output is in {log}")
        print("\n".join((proc.stdout + proc.stderr).splitlines()[-40:]))
        sys.exit(1)
    say(f"{what}: done in {time.monotonic() - t:.0f}s")
    return proc


def ansible(tool: str) -> str:
    return str(Path(sys.executable).parent / tool)


def install_collection() -> None:
    """Build the collection's tarball and install it as a user would (its dependencies are
    already in .cache/collections: Galaxy is not reachable from the lab machine)."""
    dist = REPO / "dist"
    run([ansible("ansible-galaxy"), "collection", "build", "--force", "--output-path", str(dist), "."],
        "build the collection tarball")
    tarball = max(dist.glob("tandem-dr-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    run([ansible("ansible-galaxy"), "collection", "install", "--no-deps", "--force", "-p", str(INSTALLED),
         str(tarball)], f"install {tarball.name} into {INSTALLED.relative_to(REPO)}")


def playbook(name: str, *extra: str, what: str, check: bool = True) -> subprocess.CompletedProcess:
    where = f"playbooks/{name}.yml" if FROM_CHECKOUT else f"tandem.dr.{name}"
    return run([ansible("ansible-playbook"), "-i", str(LAB / "hosts.yml"), where, *extra], what, check=check)


def control_plane_secrets() -> Path:
    path = LAB / "tandem-secrets" / "control_plane.json"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        values = {f"tandem_control_plane_{k}_password": secrets.token_hex(16)
                  for k in ("monitor", "replication", "app")}
        path.write_text(json.dumps(values))
        path.chmod(0o600)
    return path


def guest_status(host: str, ip: str) -> dict | None:
    proc = subprocess.run(["lxc-attach", "-P", "/var/lib/tandem-lab/lxc", "-n", host, "--clear-env", "--",
                           "curl", "-s", "-m", "3", f"http://{ip}/cgi-bin/status"],
                          capture_output=True, text=True, timeout=30)
    try:
        return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout else None
    except ValueError:
        return None


def durable(host: str, index: int) -> dict[str, int]:
    out = {}
    for vm, ips in VMS.items():
        st = guest_status(host, ips[index])
        if st and st.get("last_durable_seq"):
            out[vm] = st["last_durable_seq"]
    return out


def wait_durable(host: str, index: int, timeout: float = 240) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = durable(host, index)
        if len(got) == len(VMS):
            return got
        time.sleep(2)
    say(f"the VMs do not answer at {host}")
    sys.exit(1)


def center_get(path: str):
    """GET from tandem-center on the VIP, as the lab's admin (JSON, or the text of /metrics)."""
    ctx = ssl.create_default_context(cafile=str(LAB / "pki" / "center" / "ca.crt"))
    token = (LAB / "tandem-secrets" / "center-admin.token").read_text().strip()
    req = urllib.request.Request(DASHBOARD.rstrip("/") + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        body = resp.read().decode()
    return body if path == "/metrics" else json.loads(body)


def metric(text: str, name: str) -> float | None:
    """An unlabelled sample of the center's /metrics (parsed by prometheus-client, a
    dependency of the venv the demo runs in)."""
    return next((s.value for family in text_string_to_metric_families(text) for s in family.samples
                 if s.name == name and not s.labels), None)


def wait_followed(timeout: float = 120) -> None:
    """Until the center's monitor has reached every enrolled engine (dashboard and alerts live)."""
    deadline, last = time.monotonic() + timeout, "not all reachable"
    while time.monotonic() < deadline:
        try:
            text = center_get("/metrics")
            monitored = metric(text, "tandem_engines_monitored")
            reachable = metric(text, "tandem_engines_reachable")
            if monitored and reachable == monitored:
                say(f"tandem-center follows {reachable:.0f} engine(s)")
                return
        except OSError as e:
            last = e
        time.sleep(2)
    say(f"tandem-center does not follow the engines yet ({last})")
    sys.exit(1)


def center_lines() -> list[str]:
    """What the center saw of the demo: its alerts, runs and scheduled recovery points."""
    alerts = center_get("/api/v1/alerts?state=all&limit=1000")
    runs = center_get("/api/v1/runs?limit=1000")
    lines = [f"tandem-center: {len(runs)} run(s) recorded "
             f"({', '.join(sorted({r['kind'] for r in runs}))}); {len(alerts)} alert(s):"]
    for a in alerts:
        cleared = f"cleared {a['cleared_at'][11:19]}" if a.get("cleared_at") else a["state"]
        lines.append(f"  {a['raised_at'][11:19]} {a['severity']:8} {a['kind']}: {a['subject']} ({cleared})")
    for vm in center_get("/api/v1/vms"):
        rps = center_get(f"/api/v1/recovery-points?vm_id={vm['id']}&limit=1000")
        scheduled = sum(1 for rp in rps if rp["name"].startswith("center-"))
        lines.append(f"  {vm['name']}: {len(rps)} recovery point(s) recorded, "
                     f"{scheduled} by the center's schedule")
    return lines


def newest(pattern: str) -> dict:
    return json.loads(sorted(RUNS.glob(pattern))[-1].read_text())


def main() -> int:
    RUNS.mkdir(parents=True, exist_ok=True)
    run([str(LABCTL), "heal"], "lab: no faults left from before")
    run([str(LABCTL), "start", "hv-a1"], "lab: site A's hypervisor is up", check=False)
    run([str(LABCTL), "guest-image", "hv-a1", "hv-b1"],
        "lab guest image (Debian kernel + busybox), pushed to hv-a1 and hv-b1")
    if not FROM_CHECKOUT:
        install_collection()
    cp = control_plane_secrets()
    playbook("control_plane", "-e", f"@{cp}", what="control-plane trio: PostgreSQL RPO=0, witness, VIP")
    # The wheels are fetched once for the checkout, not again for each installed copy.
    center = ["-e", f"@{cp}", "-e", f"tandem_center_wheel_cache={REPO / '.cache' / 'center-wheels'}", *CENTER]
    playbook("center", *center, what="tandem-center on cp-a and cp-b, behind the VIP")
    playbook("engine", *CENTER, what="tandemd on the hypervisors (TLS, firewall, monitor endpoint)")
    playbook("enrol", *center, what="enrol the hypervisors with tandem-center (it follows the engines)")
    playbook("protect", *FILES, *CENTER,
             what="protect app01 and app02 (initial copy, VMs on tandemd at site A, in the catalogue)")
    wait_durable("hv-a1", 0)
    wait_followed()
    say(f"dashboard: {DASHBOARD} (CA: inventories/lab/pki/center/ca.crt; "
        "admin token: inventories/lab/tandem-secrets/center-admin.token)")
    playbook("drill", *FILES, *CENTER, what="non-intrusive drill (clone, isolated network, health, cleanup)")
    before = wait_durable("hv-a1", 0)
    playbook("failover", *FILES, *CENTER, "-e", "mode=planned", what="planned failover to site B (re-IP)")
    after = wait_durable("hv-b1", 1)
    planned_lost = {vm: max(0, before[vm] - after[vm]) for vm in VMS}
    playbook("failback", *FILES, *CENTER, what="failback to site A")
    wait_durable("hv-a1", 0)
    time.sleep(5)
    acked = wait_durable("hv-a1", 0)
    run([str(LABCTL), "crash", "hv-a1"], "crash site A (hv-a1: kill -9 of the whole host)")
    playbook("failover", *FILES, *CENTER, "-e", "mode=unplanned", "-e", "tandem_site_lost=true",
             what="unplanned failover to site B")
    recovered = wait_durable("hv-b1", 1)
    # The guest goes on from its last durable record: a lower number would be a lost write.
    unplanned_lost = {vm: max(0, acked[vm] - recovered[vm]) for vm in VMS}

    drill = newest("*.drill.json")
    planned, unplanned = sorted(RUNS.glob("failover-2*.json"))[-2:]
    lines = ["", "=== Tandem DR demo: report ===",
             f"drill {drill['id']}: {drill['result']}, copies healthy in "
             f"{drill['run'].get('rto_seconds')} s, cleanup {drill['cleanup_seconds']} s, "
             f"residue {len(drill['residue'])}"]
    for title, path, lost in (("planned failover", planned, planned_lost),
                              ("unplanned failover (site A crashed)", unplanned, unplanned_lost)):
        report = json.loads(path.read_text())
        verdict = "0 durable records lost (achieved RPO 0)" if not sum(lost.values()) else f"LOST {lost}"
        lines.append(f"{title}: plan RTO {report['rto_seconds']} s; {verdict}")
        for vm in report["vms"]:
            lines.append(f"  {vm['name']}: healthy {vm['healthy_seconds']} s after the run started, "
                         f"{vm['ip_before']} -> {vm['ip_after']}")
    try:
        lines += center_lines()
    except OSError as e:
        lines.append(f"tandem-center: could not be read ({e})")
    lines.append(f"total demo time: {time.monotonic() - T0:.0f} s; reports in {RUNS}; "
                 "`make demo-down` cleans up")
    print("\n".join(lines))
    (RUNS / "demo-report.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
