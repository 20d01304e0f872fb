# Copyright: Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filter that validates a recovery plan (ordered batches of VMs with start delays,
dependencies and health checks) and works out the order to start them in.

Failover, failback and drills run the same plan: batch after batch; inside a batch the VMs
start in parallel, except that a VM waits for the VMs it depends on. See docs/recovery-plans.md.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ansible.errors import AnsibleFilterError

SIDES = ("production", "dr")
PLAN_KEYS = {"name", "defaults", "batches"}
BATCH_KEYS = {"name", "vms"}
VM_KEYS = {"name", "start_delay", "depends_on", "health_check", "timeout", "on_failure"}
DEFAULT_KEYS = {"start_delay", "timeout", "on_failure", "health_check"}
ON_FAILURE = ("stop", "continue")
# Built-in defaults; the plan's `defaults` section overrides them.
DEFAULTS = {"start_delay": 0, "timeout": 300, "on_failure": "stop", "health_check": None}
CHECK_KEYS = {
    "tcp": {"port", "host"},
    "http": {"url", "port", "path", "scheme", "expect_status"},
    "ping": {"from"},
}
CHECK_COMMON = {"interval"}


def _int(value, where, errors, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        errors.append(f"{where}: must be an integer >= {minimum}, got {value!r}")
        return None
    return value


def _port(value, where, errors):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        errors.append(f"{where}: must be a port 1-65535, got {value!r}")
        return None
    return value


def _health_check(check, where, hosts, errors):
    """{type, ...} with defaults filled; type none when there is no check (running = healthy)."""
    if check in (None, "none"):
        return {"type": "none"}
    if not isinstance(check, dict) or len(set(check) - CHECK_COMMON) != 1:
        errors.append(f"{where}: expected exactly one of {', '.join(CHECK_KEYS)} "
                      "(e.g. {tcp: {port: 5432}}), or none")
        return None
    kind = next(iter(set(check) - CHECK_COMMON))
    if kind not in CHECK_KEYS:
        errors.append(f"{where}: unknown check {kind!r} (one of {', '.join(CHECK_KEYS)})")
        return None
    spec = check[kind]
    cwhere = f"{where}.{kind}"
    if not isinstance(spec, dict):
        errors.append(f"{cwhere}: expected a mapping")
        return None
    unknown = sorted(map(str, set(spec) - CHECK_KEYS[kind]))
    if unknown:
        errors.append(f"{cwhere}: unknown keys {', '.join(unknown)} "
                      f"(allowed: {', '.join(sorted(CHECK_KEYS[kind]))})")
    out = {"type": kind, "interval": _int(check.get("interval", 5), f"{where}.interval", errors, 1)}
    if kind == "tcp":
        # host: default the VM's address after the run (from the network plan).
        out.update(port=_port(spec.get("port"), f"{cwhere}.port", errors), host=spec.get("host"))
    elif kind == "http":
        out.update(_http(spec, cwhere, errors))
    else:
        out["from"] = _ping_from(spec.get("from"), f"{cwhere}.from", hosts, errors)
    return out


def _http(spec, where, errors):
    expect = spec.get("expect_status", 200)
    expect = expect if isinstance(expect, list) else [expect]
    for status in expect:
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            errors.append(f"{where}.expect_status: {status!r} is not an HTTP status (100-599)")
    url = spec.get("url")
    if url is not None:
        if {"port", "path", "scheme"} & set(spec):
            errors.append(f"{where}: give either url, or port (and path, scheme)")
        parts = urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            errors.append(f"{where}.url: {url!r} is not an http(s) URL; use {{ip}} for the VM's address")
        return {"url": str(url), "expect_status": expect}
    path = spec.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/"):
        errors.append(f"{where}.path: must start with /, got {path!r}")
    scheme = spec.get("scheme", "http")
    if scheme not in ("http", "https"):
        errors.append(f"{where}.scheme: must be http or https, got {scheme!r}")
    port = _port(spec.get("port", 443 if scheme == "https" else 80), f"{where}.port", errors)
    # The VM's address is only known once the network plan has mapped it.
    return {"url": f"{scheme}://{{ip}}:{port}{path}", "expect_status": expect}


def _ping_from(value, where, hosts, errors):
    """The host at each site that pings the VM: {production: HOST, dr: HOST}."""
    if not isinstance(value, dict) or set(value) != set(SIDES):
        errors.append(f"{where}: name a host at each site, {{production: HOST, dr: HOST}}")
        return None
    for side in SIDES:
        host = value[side]
        if not isinstance(host, str) or not host:
            errors.append(f"{where}.{side}: must name a host")
        elif hosts is not None and host not in hosts:
            errors.append(f"{where}.{side}: {host} is not in the inventory")
    return {s: value[s] for s in SIDES}


def _depends(value, where, errors):
    if value is None:
        return []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errors.append(f"{where}: expected a VM name or a list of them")
        return []
    return list(dict.fromkeys(value))


def _defaults(raw, errors):
    if raw is None:
        return dict(DEFAULTS)
    if not isinstance(raw, dict):
        errors.append("defaults: expected a mapping")
        return dict(DEFAULTS)
    unknown = sorted(map(str, set(raw) - DEFAULT_KEYS))
    if unknown:
        allowed = ", ".join(sorted(DEFAULT_KEYS))
        errors.append(f"defaults: unknown keys {', '.join(unknown)} (allowed: {allowed})")
    return {**DEFAULTS, **{k: v for k, v in raw.items() if k in DEFAULT_KEYS}}


def _vm(raw, where, defaults, hosts, errors):
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        errors.append(f"{where}: expected a VM name or a mapping with 'name'")
        return None
    where = f"{where} ({raw['name']})"
    unknown = sorted(map(str, set(raw) - VM_KEYS))
    if unknown:
        errors.append(f"{where}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(VM_KEYS))})")
    merged = {**defaults, **{k: v for k, v in raw.items() if k in DEFAULT_KEYS}}
    on_failure = merged["on_failure"]
    if on_failure not in ON_FAILURE:
        errors.append(f"{where}.on_failure: must be stop or continue, got {on_failure!r}")
    return {
        "name": raw["name"],
        "start_delay": _int(merged["start_delay"], f"{where}.start_delay", errors, 0),
        "timeout": _int(merged["timeout"], f"{where}.timeout", errors, 1),
        "on_failure": on_failure,
        "depends_on": _depends(raw.get("depends_on"), f"{where}.depends_on", errors),
        "health_check": _health_check(merged["health_check"], f"{where}.health_check", hosts, errors),
        "_where": where,
    }


def _stages(vms, where, errors):
    """Inside a batch: waves of VMs that can start together (a VM comes after the same-batch
    VMs it depends on); file order within a wave. A cycle is reported, not ordered."""
    names = [vm["name"] for vm in vms]
    waiting = {vm["name"]: {d for d in vm["depends_on"] if d in names and d != vm["name"]} for vm in vms}
    stages, done = [], set()
    while len(done) < len(names):
        ready = [n for n in names if n not in done and waiting[n] <= done]
        if not ready:
            cycle = [n for n in names if n not in done]
            errors.append(f"{where}: dependency cycle among {', '.join(cycle)}: none of them can start first")
            return stages
        stages.append(ready)
        done.update(ready)
    return stages


def recovery_plan(plan, vm_names=None, hosts=None):
    """Validate a recovery plan and return it normalised with its execution order.

    vm_names: the protection group's VMs (every plan VM must be one of them); hosts: the
    inventory host names (ping checks must name one). Returns {name, batches: [{name, index,
    vms: [...], stages: [[names]]}], order: [names], vms: {name: vm}, not_in_plan: [names]}.
    Raises AnsibleFilterError listing every problem with its place in the file.
    """
    errors = []
    if not isinstance(plan, dict):
        raise AnsibleFilterError("recovery plan: expected a mapping with 'name' and 'batches'")
    unknown = sorted(map(str, set(plan) - PLAN_KEYS))
    if unknown:
        allowed = ", ".join(sorted(PLAN_KEYS))
        errors.append(f"recovery plan: unknown keys {', '.join(unknown)} (allowed: {allowed})")
    batches = plan.get("batches")
    if not isinstance(batches, list) or not batches:
        raise AnsibleFilterError("recovery plan: 'batches' must be a non-empty list")
    hosts = set(hosts) if hosts is not None else None
    defaults = _defaults(plan.get("defaults"), errors)
    out, batch_of = [], {}
    for b, batch in enumerate(batches):
        where = f"batches[{b}]"
        if not isinstance(batch, dict) or not isinstance(batch.get("vms"), list) or not batch["vms"]:
            errors.append(f"{where}: expected a mapping with a non-empty 'vms' list")
            continue
        where = f"batches[{b}] ({batch['name']})" if batch.get("name") else where
        unknown = sorted(map(str, set(batch) - BATCH_KEYS))
        if unknown:
            errors.append(f"{where}: unknown keys {', '.join(unknown)} (allowed: name, vms)")
        vms = [_vm(raw, f"{where}.vms[{i}]", defaults, hosts, errors) for i, raw in enumerate(batch["vms"])]
        vms = [vm for vm in vms if vm]
        for vm in vms:
            if vm["name"] in batch_of:
                errors.append(f"{vm['_where']}: {vm['name']} is already in batches[{batch_of[vm['name']]}]")
            elif vm_names is not None and vm["name"] not in vm_names:
                errors.append(f"{vm['_where']}: {vm['name']} is not a VM of the protection group")
            batch_of.setdefault(vm["name"], b)
        name = str(batch.get("name") or f"batch{b + 1}")
        out.append({"name": name, "index": b, "vms": vms, "_where": where})
    for batch in out:
        for vm in batch["vms"]:
            for dep in vm["depends_on"]:
                if dep == vm["name"]:
                    errors.append(f"{vm['_where']}.depends_on: a VM cannot depend on itself")
                elif dep not in batch_of:
                    errors.append(f"{vm['_where']}.depends_on: {dep} is not in the plan")
                elif batch_of[dep] > batch["index"]:
                    errors.append(f"{vm['_where']}.depends_on: {dep} starts later, in "
                                  f"batches[{batch_of[dep]}]; move it to this batch or an earlier one")
        batch["stages"] = _stages(batch["vms"], batch.pop("_where"), errors)
    if errors:
        listing = "\n  ".join(errors)
        raise AnsibleFilterError(f"recovery plan: {len(errors)} problem(s):\n  {listing}")
    for batch in out:
        for vm in batch["vms"]:
            vm.pop("_where")
            vm["batch"] = batch["index"]
    order = [name for batch in out for stage in batch["stages"] for name in stage]
    return {
        "name": str(plan.get("name") or "recovery plan"),
        "batches": out,
        "order": order,
        "vms": {vm["name"]: vm for batch in out for vm in batch["vms"]},
        "not_in_plan": [n for n in (vm_names or []) if n not in batch_of],
    }


def recovery_plan_subset(plan, names):
    """A normalised plan cut down to the VMs in `names` (a run for some VMs of the group):
    other VMs leave their batches and stages, empty ones go, and dependencies on VMs not in
    the run are dropped (they are not started by it)."""
    keep = set(names)
    batches = []
    for batch in plan["batches"]:
        vms = [dict(vm, depends_on=[d for d in vm["depends_on"] if d in keep])
               for vm in batch["vms"] if vm["name"] in keep]
        stages = [[n for n in stage if n in keep] for stage in batch["stages"]]
        stages = [stage for stage in stages if stage]
        if vms:
            batches.append({**batch, "vms": vms, "stages": stages})
    vms = {vm["name"]: vm for batch in batches for vm in batch["vms"]}
    return {**plan, "batches": batches, "vms": vms,
            "order": [n for n in plan["order"] if n in keep],
            "not_in_plan": sorted(keep - set(plan["vms"]))}


class FilterModule:
    def filters(self):
        return {"recovery_plan": recovery_plan, "recovery_plan_subset": recovery_plan_subset}
