"""tandem-center following the lab's engines (issue 7), deployed as `make demo` does it.

The module deploys the trio, tandem-center (with its alert webhook), tandemd with its monitor
endpoint, then playbooks/enrol.yml and playbooks/protect.yml with inventories/lab/center.yml:
a VM-less resource `cwh01` replicated hv-a1 -> hv-b1, registered in the catalogue with a
policy whose sync timeout is short. Then:

- the center follows both engines and shows cwh01 in sync (API, /metrics);
- a partition of the inter-site replication link (`labctl partition a b --replication`: the
  hypervisors' data link; management and the control plane stay up): the webhook receives
  `raised` for cwh01's `degraded` alert, and `cleared` after the heal. (A partition of every
  network between A and B also stalls the trio's synchronous commits while the witness still
  sees both data nodes, so the center records and sends alerts only after the heal: see
  docs/runbooks.md, control-plane loss.)
- the RP schedule: the center takes cwh01's recovery points once per interval, and after a
  crash of the node holding the database primary the other node goes on, with no duplicate
  slot and no gap longer than one interval.

The webhook receivers listen on 127.0.0.1 of cp-a and cp-b (lab hosts may not connect to the
lab machine): the instance on the writable primary is the one that sends. Figures go to
tests/output/center_engines.json. Opt-in with the other center lab test
(`make test-center-lab`): the deployment alone takes several minutes.
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from dr_helpers import forget_resources, remove_engine
from prometheus_client.parser import text_string_to_metric_families
from test_control_plane_faults import DATA, SECRETS, TRIO, _healthy, _primary, _restore, _up

REPO = Path(__file__).resolve().parents[2]
LAB_DIR = REPO / "inventories" / "lab"
OUTPUT = REPO / "tests" / "output" / "center_engines.json"
pytestmark = pytest.mark.opt_in("TANDEM_CENTER_LAB")

URL = "https://10.202.40.100:8443"
CA = LAB_DIR / "pki" / "center" / "ca.crt"
TOKEN_FILE = LAB_DIR / "tandem-secrets" / "center-admin.token"
HOOK_PORT = 9099
HOOK_FILE = "/var/tmp/tandem-test-hooks.jsonl"
INTERVAL = 20                       # the test policy's RP interval (s)
SYNC_TIMEOUT = 5                    # degraded longer than this raises the alert
CENTER = {"tandem_center_alert_webhook_url": f"http://127.0.0.1:{HOOK_PORT}/hook",
          "tandem_center_wheel_cache": str(REPO / ".cache" / "center-wheels")}
GROUP = {"tandem_protection_group": {
    "name": "center-test",
    "center_policy": {"rp_interval": INTERVAL, "rp_retention": 50, "sync_timeout": SYNC_TIMEOUT},
    "vms": [{"name": "cwh01", "production": "hv-a1", "dr": "hv-b1", "port": 7891,
             "disks": [{"size": "16MiB"}]}]}}
# A tiny webhook receiver: every POST body becomes one line of HOOK_FILE.
RECEIVER = f"""
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open({HOOK_FILE!r}, "ab") as f:
            f.write(body.replace(b"\\n", b" ") + b"\\n")
        self.send_response(204)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", {HOOK_PORT}), H).serve_forever()
"""


def _playbook(lab, playbook: str, *files: str, extra: dict | None = None, timeout: int = 1200) -> None:
    venv_bin = Path(sys.executable).parent
    args = [a for f in files for a in ("-e", f"@{f}")]
    proc = subprocess.run(
        [str(venv_bin / "ansible-playbook"), "-i", str(lab.inventory), *args,
         "-e", json.dumps({**SECRETS, **(extra or {})}), playbook],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
             "ANSIBLE_COLLECTIONS_PATH": str(REPO / ".cache" / "collections")})
    assert proc.returncode == 0, f"{playbook} failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-2000:]}"


def _get(path: str):
    ctx = ssl.create_default_context(cafile=str(CA))
    with httpx.Client(base_url=URL, verify=ctx, timeout=5,
                      headers={"Authorization": f"Bearer {TOKEN_FILE.read_text().strip()}"}) as http:
        r = http.get(path)
        r.raise_for_status()
        return r.text if path == "/metrics" else r.json()


def _samples() -> list:
    """The center's /metrics, parsed by prometheus-client."""
    return [s for family in text_string_to_metric_families(_get("/metrics")) for s in family.samples]


def _metric(name: str) -> float | None:
    return next((s.value for s in _samples() if s.name == name and not s.labels), None)


def _notices(lab) -> list[dict]:
    out = []
    for host in DATA:
        text = lab.attach(host, "cat", HOOK_FILE).stdout
        out += [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


def _record(**figures) -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    OUTPUT.write_text(json.dumps({**old, **figures}, indent=2) + "\n")


@pytest.fixture(scope="module")
def enrolled(lab, tmp_path_factory):
    for host in (*TRIO, "hv-a1", "hv-b1"):
        if not lab.wait_for(lambda h=host: _up(lab, h), timeout=5):
            lab.labctl("start", host)
    lab.labctl("heal")
    group = tmp_path_factory.mktemp("center-engines") / "group.yml"
    group.write_text(json.dumps(GROUP))
    center_vars = str(LAB_DIR / "center.yml")
    _playbook(lab, "playbooks/control_plane.yml")
    assert lab.wait_for(lambda: _healthy(lab), timeout=120)
    for host in DATA:
        lab.attach(host, "rm", "-f", HOOK_FILE)
        lab.attach(host, "systemctl", "stop", "tandem-test-hook")
        lab.attach(host, "systemd-run", "--unit=tandem-test-hook", "python3", "-c", RECEIVER)
    _playbook(lab, "playbooks/center.yml", center_vars, extra=CENTER)
    _playbook(lab, "playbooks/engine.yml", center_vars)
    _playbook(lab, "playbooks/enrol.yml", center_vars, extra=CENTER)
    _playbook(lab, "playbooks/protect.yml", center_vars, extra={"tandem_protection_group_file": str(group)})
    yield lab
    _restore(lab)
    lab.labctl("heal")
    for host in DATA:
        lab.attach(host, "systemctl", "stop", "tandem-test-hook")
    # The hypervisors, center and trio as the other lab tests expect them: none of them.
    for host in ("hv-a1", "hv-b1"):
        forget_resources(lab, host, "cwh01")
    remove_engine(lab)
    _playbook(lab, "tests/lab/center_cleanup.yml")
    _playbook(lab, "molecule/control_plane/cleanup.yml")


def _state(vm: str) -> str | None:
    """The replication mode a hypervisor reports for the VM's resource (the first found)."""
    return next((s.labels["mode"] for s in _samples() if s.name == "tandem_replication_mode"
                 and s.labels.get("resource") == vm and s.value == 1), None)


def test_the_center_follows_the_enrolled_engines(enrolled):
    assert enrolled.wait_for(lambda: _metric("tandem_engines_reachable") == 2, timeout=120)
    assert _metric("tandem_engines_monitored") == 2
    hvs = {h["name"]: h for h in _get("/api/v1/hypervisors")}
    assert hvs["hv-a1"]["engine_url"] == "tls://10.202.10.11:7789", hvs
    assert hvs["hv-b1"]["engine_url"] == "tls://10.202.20.11:7789", hvs
    vm = next(v for v in _get("/api/v1/vms") if v["name"] == "cwh01")
    assert vm["hypervisor_id"] == hvs["hv-a1"]["id"]
    assert enrolled.wait_for(lambda: _state("cwh01") == "in-sync", timeout=120), _get("/metrics")


def test_a_partition_reaches_the_webhook_raised_then_cleared(enrolled):
    lab = enrolled
    assert lab.wait_for(lambda: _state("cwh01") == "in-sync", timeout=120)
    before = len(_notices(lab))
    t0 = time.monotonic()
    lab.labctl("partition", "a", "b", "--replication")

    def degraded(event):
        return [n for n in _notices(lab)[before:]
                if n["event"] == event and n["alert"]["kind"] == "degraded"
                and "cwh01" in n["alert"]["dedup_key"]]

    try:
        assert lab.wait_for(lambda: degraded("raised"), timeout=SYNC_TIMEOUT + 120, interval=1), _notices(lab)
        raised_s = time.monotonic() - t0
    finally:
        lab.labctl("heal")
    t1 = time.monotonic()
    assert lab.wait_for(lambda: degraded("cleared"), timeout=300, interval=1), _notices(lab)
    cleared_s = time.monotonic() - t1
    (raised,), (cleared,) = degraded("raised"), degraded("cleared")
    assert raised["alert"]["id"] == cleared["alert"]["id"] and raised["alert"]["severity"] == "critical"
    assert raised["source"] == "tandem-center" and raised["instance"] in DATA
    _record(partition_to_webhook_raised_s=round(raised_s, 1), heal_to_webhook_cleared_s=round(cleared_s, 1),
            degraded_policy_sync_timeout_s=SYNC_TIMEOUT)


def _center_rps(vm_id: int) -> list[dict]:
    return [rp for rp in _get(f"/api/v1/recovery-points?vm_id={vm_id}&limit=1000")
            if rp["name"].startswith("center-")]


def test_the_rp_schedule_survives_a_crash_of_the_primary_node(enrolled):
    lab = enrolled
    vm = next(v for v in _get("/api/v1/vms") if v["name"] == "cwh01")
    since = time.time()            # only this test's RPs: the catalogue may hold older ones

    def mine() -> list[dict]:
        return [rp for rp in _center_rps(vm["id"])
                if datetime.datetime.fromisoformat(rp["taken_at"]).timestamp() >= since]

    assert lab.wait_for(lambda: len(mine()) >= 2, timeout=4 * INTERVAL + 60)
    old = _primary(lab)
    crashed_at = time.time()
    lab.labctl("crash", old)
    try:
        time.sleep(4 * INTERVAL)             # about four slots, from whichever node took over
        rps = None
        deadline = time.monotonic() + 120
        while rps is None and time.monotonic() < deadline:
            try:
                rps = mine()
            except httpx.HTTPError:
                time.sleep(2)
        assert rps is not None, "the center did not answer after the crash"
    finally:
        lab.labctl("start", old)
    names = [rp["name"] for rp in rps]
    assert len(names) == len(set(names)), names                                  # no duplicate slot
    rps.sort(key=lambda rp: rp["taken_at"])
    taken = [datetime.datetime.fromisoformat(rp["taken_at"]).timestamp() for rp in rps]
    after = [rp for rp, t in zip(rps, taken, strict=True) if t >= crashed_at]
    assert len(after) >= 2, rps
    # The new leader is the other node (reported_by "schedule:<node>:<pid>").
    assert all(not rp["reported_by"].startswith(f"schedule:{old}:") for rp in after), after
    gaps = [b - a for a, b in zip(taken, taken[1:], strict=False)]
    # A slot is one interval; the takeover may move one RP within its slot, never skip a slot.
    assert max(gaps) < 2 * INTERVAL, gaps
    _record(schedule_interval_s=INTERVAL, schedule_max_gap_s=round(max(gaps), 1), crashed_node=old,
            schedule_first_rp_after_crash_s=round(taken[len(rps) - len(after)] - crashed_at, 1),
            rps_after_crash=len(after))
