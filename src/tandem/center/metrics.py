"""Prometheus metrics of the monitor (prometheus-client), served on /metrics.

One registry per Monitor (not the global one), so that tests and several apps in one process
do not share gauges. Per resource the labels are hypervisor, resource and vm (the protected
VM that owns the resource, "" when none does).
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Gauge

from .evaluate import MODES, figures, mode

LABELS = ("hypervisor", "resource", "vm")
ROLES = ("primary", "standby", "unknown")
COLOURS = ("green", "amber", "red")
DRILL_RESULTS = ("succeeded", "failed", "aborted")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.mode = Gauge("tandem_replication_mode", "1 for the resource's current replication mode",
                          (*LABELS, "mode"), registry=r)
        self.rpo_seconds = Gauge("tandem_rpo_exposure_seconds", "age of the oldest write the peer may "
                                 "not have (0 in sync)", LABELS, registry=r)
        self.rpo_bytes = Gauge("tandem_rpo_exposure_bytes", "acknowledged bytes the peer may not have",
                               LABELS, registry=r)
        self.oos = Gauge("tandem_out_of_sync_bytes", "out-of-sync bytes over the resource's volumes",
                         LABELS, registry=r)
        self.eta = Gauge("tandem_resync_eta_seconds", "estimated seconds to the end of the resync "
                         "(NaN when none runs)", LABELS, registry=r)
        self.rp_age = Gauge("tandem_last_rp_age_seconds", "age of the last recovery point (NaN: none)",
                            LABELS, registry=r)
        self.reachable = Gauge("tandem_engine_reachable", "1 if the engine's monitor endpoint answered "
                               "the last poll", ("hypervisor",), registry=r)
        self.engines_reachable = Gauge("tandem_engines_reachable", "engines that answered their last poll",
                                       registry=r)
        self.engines = Gauge("tandem_engines_monitored", "engines in the catalogue with an engine_url",
                             registry=r)
        self.role = Gauge("tandem_control_plane_role", "1 for this instance's control-plane role: primary "
                          "(its database is the writable primary), standby, or unknown", ("role",),
                          registry=r)
        # From the control-plane checks (tandem.center.control_plane), when configured:
        self.witness = Gauge("tandem_control_plane_witness_reachable", "1 if the pg_auto_failover "
                             "monitor (the witness) answered the last check", registry=r)
        self.vip_held = Gauge("tandem_control_plane_vip_held", "1 if the control-plane VIP is on one of "
                              "this instance's interfaces", registry=r)
        # From the catalogue (tandem.center.status), refreshed each monitor interval:
        self.vm_status = Gauge("tandem_vm_status", "1 for the protected VM's dashboard colour "
                               "(green, amber, red)", ("vm", "colour"), registry=r)
        self.plan_ready = Gauge("tandem_plan_ready", "1 if every VM of the recovery plan is a protected "
                                "VM whose status is not red", ("plan",), registry=r)
        self.plan_not_ready = Gauge("tandem_plan_vms_not_ready", "VMs of the plan that are red or not "
                                    "protected", ("plan",), registry=r)
        self.drill_result = Gauge("tandem_last_drill_result", "1 for the result of the plan's last "
                                  "finished drill (plan \"\": drills without a plan)", ("plan", "result"),
                                  registry=r)
        self.drill_time = Gauge("tandem_last_drill_timestamp_seconds", "when the plan's last finished "
                                "drill ended (Unix time)", ("plan",), registry=r)
        self._seen: dict[str, set[tuple[str, str]]] = {}     # hypervisor -> {(resource, vm)}
        self._reachable: dict[str, bool] = {}
        self.set_role("unknown")

    def set_role(self, role: str) -> None:
        for r in ROLES:
            self.role.labels(role=r).set(1 if r == role else 0)

    def set_reachable(self, hv: str, ok: bool) -> None:
        self._reachable[hv] = ok
        self.reachable.labels(hypervisor=hv).set(1 if ok else 0)
        self.engines_reachable.set(sum(self._reachable.values()))

    def set_engines(self, names: set[str]) -> None:
        self.engines.set(len(names))
        for hv in set(self._reachable) - names:
            del self._reachable[hv]
            self.reachable.remove(hv)
            self._forget(hv, set())
        self.engines_reachable.set(sum(self._reachable.values()))

    def update(self, hv: str, resources: list[dict], vms: dict[str, str]) -> None:
        now = set()
        for res in resources:
            vm = vms.get(res["name"], "")
            now.add((res["name"], vm))
            labels = {"hypervisor": hv, "resource": res["name"], "vm": vm}
            current = mode(res)
            for m in MODES:
                self.mode.labels(**labels, mode=m).set(1 if m == current else 0)
            f = figures(res)
            self.rpo_seconds.labels(**labels).set(f["rpo_seconds"])
            self.rpo_bytes.labels(**labels).set(f["rpo_bytes"])
            self.oos.labels(**labels).set(f["out_of_sync_bytes"])
            self.eta.labels(**labels).set(_or_nan(f["sync_eta_seconds"]))
            self.rp_age.labels(**labels).set(_or_nan(f["last_rp_age_s"]))
        self._forget(hv, now)

    def update_catalogue(self, vms: dict[str, str], plans: list[dict], drills: list[dict]) -> None:
        """vms: name -> colour; plans: status.plan_readiness(); drills: status.last_drills()."""
        self.vm_status.clear()
        for vm, colour in vms.items():
            for c in COLOURS:
                self.vm_status.labels(vm=vm, colour=c).set(1 if c == colour else 0)
        self.plan_ready.clear()
        self.plan_not_ready.clear()
        for p in plans:
            self.plan_ready.labels(plan=p["plan"]).set(1 if p["ready"] else 0)
            self.plan_not_ready.labels(plan=p["plan"]).set(len(p["not_ready"]))
        self.drill_result.clear()
        self.drill_time.clear()
        for d in drills:
            for result in DRILL_RESULTS:
                self.drill_result.labels(plan=d["plan"], result=result).set(1 if d["state"] == result else 0)
            self.drill_time.labels(plan=d["plan"]).set(d["finished_at"])

    def _forget(self, hv: str, keep: set[tuple[str, str]]) -> None:
        for name, vm in self._seen.get(hv, set()) - keep:
            for g in (self.rpo_seconds, self.rpo_bytes, self.oos, self.eta, self.rp_age):
                g.remove(hv, name, vm)
            for m in MODES:
                self.mode.remove(hv, name, vm, m)
        self._seen[hv] = keep


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value
