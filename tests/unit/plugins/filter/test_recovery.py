"""The recovery_plan filter: defaults, health checks, dependencies (earlier or same batch, no
forward references, no cycles), the start order, and bad shapes with their place in the file."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.tandem.dr.plugins.filter import recovery

ROOT = Path(__file__).resolve().parents[4]
HOSTS = ["hv-a1", "hv-b1", "cp-a", "cp-b"]


def plan(*batches, **top):
    return {
        "name": "p",
        "batches": [{"name": f"b{i}", "vms": list(vms)} for i, vms in enumerate(batches)],
        **top,
    }


def problems(p, vm_names=None, hosts=None):
    with pytest.raises(AnsibleFilterError) as e:
        recovery.recovery_plan(p, vm_names, hosts)
    return str(e.value)


def test_defaults_are_filled_and_a_name_alone_is_a_vm():
    got = recovery.recovery_plan(plan(["db01"]))
    assert got["vms"]["db01"] == {
        "name": "db01",
        "start_delay": 0,
        "timeout": 300,
        "on_failure": "stop",
        "depends_on": [],
        "health_check": {"type": "none"},
        "batch": 0,
    }
    assert got["order"] == ["db01"] and got["batches"][0]["stages"] == [["db01"]]


def test_plan_defaults_override_the_built_in_ones_and_vms_override_them():
    p = plan(
        [{"name": "db01"}, {"name": "web01", "timeout": 30}],
        defaults={"timeout": 120, "on_failure": "continue", "health_check": {"tcp": {"port": 22}}},
    )
    got = recovery.recovery_plan(p)["vms"]
    assert got["db01"]["timeout"] == 120 and got["web01"]["timeout"] == 30
    assert got["db01"]["on_failure"] == "continue"
    assert got["web01"]["health_check"] == {"type": "tcp", "interval": 5, "port": 22, "host": None}


HEALTH = [
    ({"tcp": {"port": 5432}}, {"type": "tcp", "interval": 5, "port": 5432, "host": None}),
    (
        {"tcp": {"port": 80, "host": "10.0.0.9"}, "interval": 2},
        {"type": "tcp", "interval": 2, "port": 80, "host": "10.0.0.9"},
    ),
    (
        {"http": {"port": 8080, "path": "/status"}},
        {"type": "http", "interval": 5, "url": "http://{ip}:8080/status", "expect_status": [200]},
    ),
    (
        {"http": {"scheme": "https"}},
        {"type": "http", "interval": 5, "url": "https://{ip}:443/", "expect_status": [200]},
    ),
    (
        {"http": {"url": "http://{ip}/healthz", "expect_status": [200, 204]}},
        {"type": "http", "interval": 5, "url": "http://{ip}/healthz", "expect_status": [200, 204]},
    ),
    (
        {"ping": {"from": {"production": "hv-a1", "dr": "hv-b1"}}},
        {"type": "ping", "interval": 5, "from": {"production": "hv-a1", "dr": "hv-b1"}},
    ),
    ("none", {"type": "none"}),
]


@pytest.mark.parametrize("check, want", HEALTH, ids=[str(c[0]) for c in HEALTH])
def test_health_checks(check, want):
    got = recovery.recovery_plan(plan([{"name": "db01", "health_check": check}]), hosts=HOSTS)
    assert got["vms"]["db01"]["health_check"] == want


def test_start_order_batches_and_waves_inside_a_batch():
    p = plan(
        [{"name": "db01"}, {"name": "db02"}],
        [
            {"name": "app01", "depends_on": ["db01", "cache"]},
            {"name": "cache", "depends_on": "db02"},
            {"name": "web01", "depends_on": ["app01"]},
            {"name": "batch"},
        ],
    )
    got = recovery.recovery_plan(p)
    assert got["batches"][0]["stages"] == [["db01", "db02"]]
    # cache and batch have no same-batch dependency: they start first, together.
    assert got["batches"][1]["stages"] == [["cache", "batch"], ["app01"], ["web01"]]
    assert got["order"] == ["db01", "db02", "cache", "batch", "app01", "web01"]
    assert got["vms"]["app01"]["depends_on"] == ["db01", "cache"] and got["vms"]["app01"]["batch"] == 1


def test_vms_of_the_group_left_out_of_the_plan_are_listed():
    got = recovery.recovery_plan(plan(["db01"]), vm_names=["db01", "web01"])
    assert got["not_in_plan"] == ["web01"]


def test_forward_reference_is_rejected():
    text = problems(plan([{"name": "web01", "depends_on": ["db01"]}], ["db01"]))
    assert "batches[0] (b0).vms[0] (web01).depends_on: db01 starts later, in batches[1]" in text


@pytest.mark.parametrize(
    "vms, cycle",
    [
        ([{"name": "a", "depends_on": "b"}, {"name": "b", "depends_on": "a"}], "a, b"),
        (
            [
                {"name": "a", "depends_on": "c"},
                {"name": "b", "depends_on": "a"},
                {"name": "c", "depends_on": "b"},
                "d",
            ],
            "a, b, c",
        ),
    ],
)
def test_cycles_are_rejected(vms, cycle):
    assert f"batches[0] (b0): dependency cycle among {cycle}" in problems(plan(vms))


BAD = [
    ("self dependency", plan([{"name": "a", "depends_on": "a"}]), "a VM cannot depend on itself"),
    ("unknown dependency", plan([{"name": "a", "depends_on": ["x"]}]), "depends_on: x is not in the plan"),
    ("depends_on not names", plan([{"name": "a", "depends_on": [1]}]), "expected a VM name or a list"),
    ("listed twice", plan(["a"], ["a"]), "batches[1] (b1).vms[0] (a): a is already in batches[0]"),
    ("negative delay", plan([{"name": "a", "start_delay": -1}]), "start_delay: must be an integer >= 0"),
    ("zero timeout", plan([{"name": "a", "timeout": 0}]), "timeout: must be an integer >= 1"),
    ("bool timeout", plan([{"name": "a", "timeout": True}]), "timeout: must be an integer >= 1"),
    ("on_failure", plan([{"name": "a", "on_failure": "retry"}]), "on_failure: must be stop or continue"),
    ("unknown vm key", plan([{"name": "a", "delay": 3}]), "vms[0] (a): unknown keys delay"),
    ("unknown check", plan([{"name": "a", "health_check": {"smtp": {}}}]), "unknown check 'smtp'"),
    ("two checks", plan([{"name": "a", "health_check": {"tcp": {"port": 1}, "http": {}}}]), "exactly one of"),
    ("tcp without port", plan([{"name": "a", "health_check": {"tcp": {}}}]), "tcp.port: must be a port"),
    (
        "bad http status",
        plan([{"name": "a", "health_check": {"http": {"expect_status": 99}}}]),
        "not an HTTP status",
    ),
    (
        "url and port",
        plan([{"name": "a", "health_check": {"http": {"url": "http://x/", "port": 1}}}]),
        "either url",
    ),
    (
        "bad url",
        plan([{"name": "a", "health_check": {"http": {"url": "ftp://x/"}}}]),
        "is not an http(s) URL",
    ),
    (
        "bad path",
        plan([{"name": "a", "health_check": {"http": {"path": "status"}}}]),
        "path: must start with /",
    ),
    (
        "ping one side",
        plan([{"name": "a", "health_check": {"ping": {"from": "hv-a1"}}}]),
        "name a host at each site",
    ),
    (
        "ping unknown host",
        plan([{"name": "a", "health_check": {"ping": {"from": {"production": "hv-a1", "dr": "nope"}}}}]),
        "from.dr: nope is not in the inventory",
    ),
    (
        "unknown check key",
        plan([{"name": "a", "health_check": {"tcp": {"port": 1, "hots": "x"}}}]),
        "unknown keys hots",
    ),
    (
        "batch without vms",
        {"batches": [{"name": "x"}]},
        "batches[0]: expected a mapping with a non-empty 'vms'",
    ),
    ("unknown batch key", {"batches": [{"vms": ["a"], "parallel": 2}]}, "unknown keys parallel"),
    ("unknown plan key", {"batches": [{"vms": ["a"]}], "waves": []}, "unknown keys waves"),
    (
        "bad defaults",
        {"batches": [{"vms": ["a"]}], "defaults": {"retries": 2}},
        "defaults: unknown keys retries",
    ),
    ("vm not a mapping", plan([3]), "expected a VM name or a mapping with 'name'"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_plans_are_rejected_with_their_place(case):
    assert case[2] in problems(case[1], hosts=HOSTS)


def test_vm_not_in_the_protection_group():
    assert "vms[0] (ghost): ghost is not a VM of the protection group" in problems(plan(["ghost"]), ["db01"])


@pytest.mark.parametrize("bad", [None, [], {"batches": []}, {"batches": "db01"}])
def test_plan_shape(bad):
    with pytest.raises(AnsibleFilterError, match="recovery plan"):
        recovery.recovery_plan(bad)


def test_every_problem_at_once():
    text = problems(
        plan(
            [{"name": "a", "timeout": 0}, {"name": "b", "on_failure": "x"}],
            [{"name": "c", "depends_on": "d"}],
        )
    )
    assert "3 problem(s)" in text


@pytest.mark.parametrize("inventory", ["example", "lab"])
def test_shipped_plans_start_the_database_first(inventory):
    base = ROOT / "inventories" / inventory
    group = yaml.safe_load((base / "protection_group.yml").read_text())["tandem_protection_group"]
    p = yaml.safe_load((base / "recovery_plan.yml").read_text())["tandem_recovery_plan"]
    got = recovery.recovery_plan(p, [vm["name"] for vm in group["vms"]], HOSTS)
    first, second = got["order"]
    assert got["vms"][second]["depends_on"] == [first]
    assert got["vms"][first]["batch"] < got["vms"][second]["batch"]


HOSTILE = [None, True, 0, -1, 70000, "", "x", "db01", [], [None], ["web01"], {}, {"x": 1}]


def _paths(node, path=()):
    yield path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*path, key))


def test_every_value_of_the_example_replaced_by_junk_is_refused_or_still_valid():
    example = yaml.safe_load((ROOT / "inventories/example/recovery_plan.yml").read_text())[
        "tandem_recovery_plan"
    ]
    refused = 0
    for path in _paths(example):
        for junk in HOSTILE:
            p = copy.deepcopy(example)
            if path:
                node = p
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = junk
            else:
                p = junk
            try:
                recovery.recovery_plan(p, ["db01", "web01"], HOSTS)
            except AnsibleFilterError:
                refused += 1
    assert refused > 50


def test_subset_keeps_order_and_drops_what_the_run_does_not_start():
    full = recovery.recovery_plan({"batches": [
        {"name": "db", "vms": ["db01", "db02"]},
        {"name": "app", "vms": [{"name": "app01", "depends_on": ["db01", "app02"]}, "app02"]},
    ]})
    sub = recovery.recovery_plan_subset(full, ["app01", "db02", "app02", "web09"])
    assert [b["name"] for b in sub["batches"]] == ["db", "app"]
    assert sub["batches"][0]["stages"] == [["db02"]]
    assert sub["batches"][1]["stages"] == [["app02"], ["app01"]]
    assert sub["vms"]["app01"]["depends_on"] == ["app02"]         # db01 is not in this run
    assert sub["order"] == ["db02", "app02", "app01"] and sub["not_in_plan"] == ["web09"]
    assert [b["name"] for b in recovery.recovery_plan_subset(full, ["app02"])["batches"]] == ["app"]
