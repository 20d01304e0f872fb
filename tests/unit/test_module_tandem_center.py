"""The tandem_center_* modules against a live tandem-center (tests/unit/center_live.py): the real
app under uvicorn on loopback, a real PostgreSQL, real tokens. Nothing of ours is mocked; the
modules run in-process (exit_json/fail_json caught) and, for no_log, through `ansible`."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from center_live import pki, start

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
API = "/api/v1"


class Exit(Exception):
    def __init__(self, result, failed):
        super().__init__(result.get("msg", ""))
        self.result, self.failed = result, failed


def run(monkeypatch, module_name, params, check=False, diff=False, fail=False):
    """main() of tandem.dr.<module_name> with params; its result (a failure must be expected)."""
    def leave(failed):
        def exit_(self, **kw):
            raise Exit(kw, failed)
        return exit_

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", leave(False))
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", leave(True))
    module = importlib.import_module(f"ansible_collections.tandem.dr.plugins.modules.{module_name}")
    with patch_module_args({**params, "_ansible_check_mode": check, "_ansible_diff": diff}), \
            pytest.raises(Exit) as info:
        module.main()
    assert info.value.failed == fail, info.value.result
    return info.value.result


def conn(center, who="operator", **extra):
    return {"url": center.url, "token": center.tokens[who], **extra}


def api(center, method, path, body=None, who="admin"):
    r = httpx.request(method, center.url + API + path, json=body, timeout=30,
                      headers={"Authorization": f"Bearer {center.tokens[who]}"})
    assert r.status_code < 300, r.text
    return r.json()


@pytest.fixture(scope="module")
def catalogue(center):
    """Two sites, a hypervisor, a policy, VMs db01 and web01 (web01 with two disks), plan web."""
    ids = {s: api(center, "POST", "/sites", {"name": s})["id"] for s in ("site-a", "site-b")}
    hv = api(center, "POST", "/hypervisors",
             {"name": "hv-a1", "site_id": ids["site-a"], "address": "10.0.0.11"})
    policy = api(center, "POST", "/policies", {"name": "gold", "rp_interval_s": 300, "rp_retention": 24,
                                               "sync_timeout_s": 60})
    for name, disks in (("db01", ["vda"]), ("web01", ["vda", "vdb"])):
        vm = api(center, "POST", "/vms", {"name": name, "production_site_id": ids["site-a"],
                                          "dr_site_id": ids["site-b"], "hypervisor_id": hv["id"],
                                          "policy_id": policy["id"]})
        for n, dev in enumerate(disks):
            api(center, "POST", "/volumes", {"vm_id": vm["id"], "resource": name, "volume": n,
                                             "target_dev": dev, "size_bytes": (n + 1) << 30})
    mapping = api(center, "POST", "/network-mappings", {"name": "dr-nets", "document": {"networks": [
        {"source": "br-a", "target": "br-b", "target_cidr": "10.9.0.0/24"}]}})
    api(center, "POST", "/network-mappings", {"name": "unused", "document": {"networks": [
        {"source": "x", "target": "y"}]}})
    groups = [{"name": "data", "vms": ["db01"]}, {"name": "front", "vms": ["web01"], "start_delay_s": 10}]
    api(center, "POST", "/plans", {"name": "web", "network_mapping_id": mapping["id"],
                                   "document": {"groups": groups}})
    return ids


# -- inventory and plans ------------------------------------------------------------------------

def test_vm_info_is_the_protected_vm_inventory(center, catalogue, monkeypatch):
    got = run(monkeypatch, "tandem_center_vm_info", conn(center, "reader"))
    assert got["changed"] is False and got["missing"] == []
    assert [v["name"] for v in got["vms"]] == ["db01", "web01"]
    web = got["vms"][1]
    assert (web["production_site"], web["dr_site"], web["plans"]) == ("site-a", "site-b", ["web"])
    assert web["hypervisor"] == {"name": "hv-a1", "address": "10.0.0.11", "site": "site-a"}
    assert web["policy"]["rp_interval_s"] == 300 and web["policy"]["name"] == "gold"
    disks = [(v["target_dev"], v["size_bytes"]) for v in web["volumes"]]
    assert disks == [("vda", 1 << 30), ("vdb", 2 << 30)]
    one = run(monkeypatch, "tandem_center_vm_info", {**conn(center, "reader"), "names": ["db01", "nosuch"]},
              check=True)
    assert [v["name"] for v in one["vms"]] == ["db01"] and one["missing"] == ["nosuch"]


def test_plan_info_gives_plans_and_their_network_mappings(center, catalogue, monkeypatch):
    got = run(monkeypatch, "tandem_center_plan_info", {**conn(center, "reader"), "names": ["web"]})
    [plan] = got["plans"]
    assert plan["network_mapping"] == "dr-nets"
    assert [(g["name"], g["vms"], g["start_delay_s"]) for g in plan["document"]["groups"]] == \
        [("data", ["db01"], 0), ("front", ["web01"], 10)]
    assert [m["name"] for m in got["network_mappings"]] == ["dr-nets"]      # only those the plans use
    assert got["network_mappings"][0]["document"]["networks"][0]["target_cidr"] == "10.9.0.0/24"
    every = run(monkeypatch, "tandem_center_plan_info", conn(center, "reader"))
    assert [m["name"] for m in every["network_mappings"]] == ["dr-nets", "unused"]
    unknown = run(monkeypatch, "tandem_center_plan_info", {**conn(center, "reader"), "names": ["x"]})
    assert unknown["missing"] == ["x"] and unknown["plans"] == []


def test_vm_registers_a_protected_vm_idempotently(center, catalogue, monkeypatch):
    vm = {**conn(center, "admin"), "name": "app01", "production_site": "site-a", "dr_site": "site-b",
          "hypervisor": "hv-a1", "policy": "gold",
          "volumes": [{"resource": "app01", "volume": 0, "target_dev": "vda", "size_bytes": 1 << 30}]}
    audit = len(center.db.audit_rows())
    check = run(monkeypatch, "tandem_center_vm", vm, check=True, diff=True)
    assert check["changed"] and check["actions"] == ["create vm app01", "create volume app01/0 (vda)"]
    assert check["diff"]["before"] == {} and check["diff"]["after"]["volumes"][0]["target_dev"] == "vda"
    assert len(center.db.audit_rows()) == audit and center.count("protected_vms WHERE name = 'app01'") == 0
    made = run(monkeypatch, "tandem_center_vm", vm)
    assert made["changed"] and [v["target_dev"] for v in made["vm"]["volumes"]] == ["vda"]
    assert not run(monkeypatch, "tandem_center_vm", vm)["changed"]                    # idempotent
    audit = len(center.db.audit_rows())
    vdb = {"resource": "app01", "volume": 1, "target_dev": "vdb", "size_bytes": 1 << 20}
    grown = {**vm, "volumes": [{**vm["volumes"][0], "size_bytes": 2 << 30}, vdb], "hypervisor": None}
    changed = run(monkeypatch, "tandem_center_vm", grown, diff=True)
    assert changed["actions"] == ["update vm app01", "update volume app01/0 (vda)",
                                  "create volume app01/1 (vdb)"]
    assert changed["vm"]["hypervisor_id"] is None and len(changed["vm"]["volumes"]) == 2
    assert len(center.db.audit_rows()) == audit + 3                                     # each change audited
    bad = run(monkeypatch, "tandem_center_vm", {**vm, "policy": "nosuch"}, fail=True)
    assert "no policy 'nosuch'" in bad["msg"]
    operator = run(monkeypatch, "tandem_center_vm", {**vm, "token": center.tokens["operator"]}, fail=True)
    assert operator["status"] == 403
    assert run(monkeypatch, "tandem_center_vm", {**vm, "state": "absent"}, check=True)["changed"]
    gone = run(monkeypatch, "tandem_center_vm", {**vm, "state": "absent"})
    assert gone["actions"] == ["delete vm app01"] and center.count("vm_volumes WHERE resource = 'app01'") == 0
    assert not run(monkeypatch, "tandem_center_vm", {**vm, "state": "absent"})["changed"]


def test_site_hypervisor_and_policy_enrol_idempotently(center, monkeypatch):
    """What the enrolment playbook does: a site, its hypervisor with the engine's URL, a policy;
    check mode changes nothing, a second run changes nothing, a change is one audited PUT."""
    admin = conn(center, "admin")
    site = {**admin, "name": "site-e", "description": "enrol test"}
    hv = {**admin, "name": "hv-e1", "site": "site-e", "address": "10.0.9.11",
          "engine_url": "tls://10.0.9.11:7789"}
    policy = {**admin, "name": "enrol-gold", "rp_interval": 300, "rp_retention": 12, "sync_timeout": 60}
    assert "no site 'site-e'" in run(monkeypatch, "tandem_center_hypervisor", hv, fail=True)["msg"]
    audit = len(center.db.audit_rows())
    check = run(monkeypatch, "tandem_center_site", site, check=True, diff=True)
    assert check["actions"] == ["create site site-e"]
    assert check["diff"]["after"]["description"] == "enrol test"
    assert len(center.db.audit_rows()) == audit and center.count("sites WHERE name = 'site-e'") == 0
    for module, params, kind in (("tandem_center_site", site, "site"),
                                 ("tandem_center_hypervisor", hv, "hypervisor"),
                                 ("tandem_center_policy", policy, "policy")):
        made = run(monkeypatch, module, params)
        assert made["changed"] and made[kind]["name"] == params["name"], made
        assert not run(monkeypatch, module, params)["changed"]                          # idempotent
    assert len(center.db.audit_rows()) == audit + 3
    moved = run(monkeypatch, "tandem_center_hypervisor", {**hv, "engine_url": ""}, diff=True)
    assert moved["actions"] == ["update hypervisor hv-e1"] and moved["hypervisor"]["engine_url"] is None
    assert moved["diff"]["before"]["engine_url"] == "tls://10.0.9.11:7789"
    tighter = run(monkeypatch, "tandem_center_policy", {**policy, "rp_interval": 60})
    assert tighter["policy"]["rp_interval_s"] == 60 and tighter["policy"]["rp_retention"] == 12
    assert run(monkeypatch, "tandem_center_policy", {**policy, "token": center.tokens["operator"]},
               fail=True)["status"] == 403
    bad = run(monkeypatch, "tandem_center_policy", {**policy, "rp_interval": 0}, fail=True)
    assert bad["status"] == 422 and "rp_interval_s" in bad["msg"]
    for module, params in (("tandem_center_hypervisor", hv), ("tandem_center_site", site),
                           ("tandem_center_policy", policy)):
        assert run(monkeypatch, module, {**params, "state": "absent"})["changed"]
        assert not run(monkeypatch, module, {**params, "state": "absent"})["changed"]
    assert center.count("sites WHERE name = 'site-e'") == 0


# -- recording runs -----------------------------------------------------------------------------

STEP = {"key": "start-db01", "name": "started db01", "status": "changed",
        "started_at": "2026-11-30T04:00:00Z", "detail": {"vms": {"db01": {"started_at": 1764475200.5}}}}


def test_run_is_recorded_once_with_honest_check_mode(center, monkeypatch):
    base = {**conn(center), "key": "drill-web-1", "series": "drill-web", "kind": "drill",
            "parameters": {"plan": "web"}}
    runs, audit = center.count("runs"), len(center.db.audit_rows())
    check = run(monkeypatch, "tandem_center_run", {**base, "steps": [STEP]}, check=True, diff=True)
    assert check["changed"] and check["created"] and check["appended"] == ["start-db01"]
    assert check["run"] is None
    assert check["diff"]["after"]["steps"] == ["start-db01: started db01 (changed)"]
    assert (center.count("runs"), len(center.db.audit_rows())) == (runs, audit)    # nothing recorded
    made = run(monkeypatch, "tandem_center_run", {**base, "steps": [STEP]})
    assert made["changed"] and made["created"] and made["run"]["state"] == "running"
    assert [(s["seq"], s["key"]) for s in made["run"]["steps"]] == [(1, "start-db01")]
    assert made["run"]["started_by"] == "test-operator"
    # The same again (the step's time in another zone is the same instant): no change, no write.
    same = {**STEP, "started_at": "2026-11-30T05:00:00+01:00"}
    again = run(monkeypatch, "tandem_center_run", {**base, "steps": [same]})
    assert not again["changed"] and again["appended"] == [] and center.count("run_steps") == 1
    # A step only by key, then the finish; finishing again is a no-op.
    health = {"key": "health-db01", "name": "db01 healthy", "status": "ok"}
    check = run(monkeypatch, "tandem_center_run", {**conn(center), "key": "drill-web-1", "steps": [health],
                                                   "state": "succeeded", "result": {"rto": 3.5}}, check=True)
    assert check["changed"] and check["finished"] and check["run"]["state"] == "running"
    done = run(monkeypatch, "tandem_center_run", {**conn(center), "key": "drill-web-1",
                                                  "steps": [STEP, health], "state": "succeeded",
                                                  "result": {"rto": 3.5}})
    assert done["changed"] and done["appended"] == ["health-db01"] and done["finished"]
    assert done["run"]["state"] == "succeeded" and done["run"]["result"] == {"rto": 3.5}
    assert [s["key"] for s in done["run"]["steps"]] == ["start-db01", "health-db01"]
    twice = run(monkeypatch, "tandem_center_run", {**conn(center), "key": "drill-web-1", "state": "succeeded",
                                                   "result": {"rto": 3.5}})
    assert not twice["changed"] and not twice["finished"]
    info = run(monkeypatch, "tandem_center_run_info", {**conn(center, "reader"), "series": "drill-web"})
    assert info["found"] and info["run"]["key"] == "drill-web-1" and len(info["run"]["steps"]) == 2


def test_run_conflicts_fail_and_record_nothing(center, monkeypatch):
    base = {**conn(center), "key": "failover-web-1", "kind": "failover", "parameters": {"plan": "web"}}
    run(monkeypatch, "tandem_center_run", {**base, "steps": [STEP]})
    steps, audit = center.count("run_steps"), len(center.db.audit_rows())
    cases = [
        ({**base, "kind": "drill"}, "has kind 'failover', not 'drill'"),
        ({**base, "parameters": {"plan": "db"}}, "has parameters"),
        ({**base, "steps": [{**STEP, "status": "failed"}]}, "recorded with other values"),
        ({**base, "steps": [{**STEP, "key": "a"}, {**STEP, "key": "a"}]}, "given twice"),
        ({**conn(center), "key": "nosuch", "steps": [STEP]}, "kind is needed to create it"),
        ({**base, "steps": [{**STEP, "key": "b", "started_at": "2026-11-30T04:00:00"}]}, "needs a time zone"),
    ]
    for params, message in cases:
        got = run(monkeypatch, "tandem_center_run", params, fail=True)
        assert message in got["msg"], got["msg"]
    assert (center.count("run_steps"), len(center.db.audit_rows())) == (steps, audit)
    run(monkeypatch, "tandem_center_run", {**base, "state": "failed"})
    late = run(monkeypatch, "tandem_center_run", {**base, "steps": [{**STEP, "key": "late"}]}, fail=True)
    assert "is failed: no more steps" in late["msg"]
    other = run(monkeypatch, "tandem_center_run", {**base, "state": "succeeded"}, fail=True)
    assert "already failed" in other["msg"]


def test_bad_token_and_too_small_a_role_are_clear_failures(center, monkeypatch):
    params = {**conn(center), "key": "drill-x", "kind": "drill"}
    for token, status, words in (("tdc_nosuchtoken", 401, "invalid or revoked token"),
                                 (center.tokens["revoked"], 401, "missing, unknown or revoked"),
                                 ("not-a-token", 401, "invalid token")):
        got = run(monkeypatch, "tandem_center_run", {**params, "token": token}, fail=True)
        assert got["status"] == status and words in got["msg"], got
        assert token not in json.dumps(got)
    denied = run(monkeypatch, "tandem_center_run", {**params, "token": center.tokens["reader"]}, fail=True)
    assert denied["status"] == 403 and "needs the operator role" in denied["msg"]
    assert center.count("runs") == center.count("runs WHERE key = 'drill-x'") + center.count(
        "runs WHERE key IS DISTINCT FROM 'drill-x'") and center.count("runs WHERE key = 'drill-x'") == 0
    away = run(monkeypatch, "tandem_center_vm_info", {**conn(center), "url": "http://127.0.0.1:9"}, fail=True)
    assert away["status"] is None and "cannot reach tandem-center" in away["msg"]


def test_the_token_is_not_logged(center, tmp_path):
    """The token is no_log: masked in the module's invocation (what -vvv and callbacks show) and
    absent from everything ansible prints, whether it comes from an option or the environment."""
    token, env = center.tokens["operator"], _ansible_env()
    args = tmp_path / "args.json"
    params = {"url": center.url, "token": token, "key": "nolog-1", "kind": "drill"}
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {**params, "_ansible_inject_invocation": True}}))
    module = "ansible_collections.tandem.dr.plugins.modules.tandem_center_run"
    proc = subprocess.run([sys.executable, "-m", module, str(args)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    result = json.loads(proc.stdout)
    assert result["changed"] and result["run"]["key"] == "nolog-1", proc.stdout
    assert result["invocation"]["module_args"]["token"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert token not in proc.stdout + proc.stderr
    env["TANDEM_CENTER_TOKEN"], env["ANSIBLE_LOG_PATH"] = token, str(tmp_path / "ansible.log")
    for extra, key in (("", "nolog-2"), (" token=tdc_bad", "nolog-3")):
        args = f"url={center.url} key={key} kind=drill{extra}"
        proc = subprocess.run([str(BIN / "ansible"), "localhost", "-c", "local", "-i", "localhost,", "-vvv",
                               "-m", "tandem.dr.tandem_center_run", "-a", args], env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        out = proc.stdout + proc.stderr + (tmp_path / "ansible.log").read_text()
        assert key in out and token not in out and "tdc_bad" not in out, out[-3000:]
    assert center.count("runs WHERE key = 'nolog-2'") == 1         # the environment's token was used
    assert center.count("runs WHERE key = 'nolog-3'") == 0         # the bad one was refused


def _ansible_env() -> dict:
    return {**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "ANSIBLE_COLLECTIONS_PATH": str(REPO / ".cache" / "collections"),
            "PYTHONPATH": str(REPO / ".cache" / "collections")}


def test_mutual_tls(pg, template_db, tmp_path, monkeypatch):
    """ca_path, client_cert and client_key against a center that requires a client certificate."""
    pki(tmp_path)
    live = start(pg, template_db, tmp_path / "srv", tls_cert=str(tmp_path / "server.crt"),
                 tls_key=str(tmp_path / "server.key"), tls_client_ca=str(tmp_path / "ca.crt"),
                 tls_require_client_cert=True)
    import ssl
    verify = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    verify.load_cert_chain(str(tmp_path / "client.crt"), str(tmp_path / "client.key"))
    live.url = live.server.start("https", verify=verify).url
    try:
        tls = {"ca_path": str(tmp_path / "ca.crt"), "client_cert": str(tmp_path / "client.crt"),
               "client_key": str(tmp_path / "client.key")}
        ok = run(monkeypatch, "tandem_center_vm_info", conn(live, "reader", **tls))
        assert ok["vms"] == []
        no_cert = run(monkeypatch, "tandem_center_vm_info", conn(live, "reader", ca_path=tls["ca_path"]),
                      fail=True)
        assert no_cert["status"] is None and "cannot reach" in no_cert["msg"]
        no_ca = run(monkeypatch, "tandem_center_vm_info", conn(live, "reader", client_cert=tls["client_cert"],
                                                               client_key=tls["client_key"]), fail=True)
        assert "CERTIFICATE_VERIFY_FAILED" in no_ca["msg"] or "certificate verify failed" in no_ca["msg"]
    finally:
        live.server.stop()
        pg.drop_db(live.db.name)
