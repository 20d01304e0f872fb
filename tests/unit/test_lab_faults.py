"""Fault commands reject bad input before they touch the machine."""

from __future__ import annotations

import pytest
from tandem_lab import faults, topology
from tandem_lab.topology import TopologyError

TOPO = topology.load()


@pytest.fixture(autouse=True)
def no_commands(monkeypatch):
    # Bad input must be refused before any command runs.
    def refuse(*args, **kwargs):
        raise AssertionError(f"a command ran: {args}")
    monkeypatch.setattr(faults, "run", refuse)
    monkeypatch.setattr(faults.network, "table_exists", refuse)


@pytest.mark.parametrize("call, error, message", [
    (lambda: faults.partition(TOPO, "a", "a"), TopologyError, "itself"),
    (lambda: faults.partition(TOPO, "a", "d"), TopologyError, "unknown site 'd'"),
    (lambda: faults.partition(TOPO, "a", "c", replication_only=True), TopologyError,
     "site c has no replication"),
    (lambda: faults.loss(TOPO, "a", "b", 0), ValueError, "between 1 and 99"),
    (lambda: faults.loss(TOPO, "a", "b", 100), ValueError, "use partition"),
    (lambda: faults.loss(TOPO, "a", "x", 10), TopologyError, "unknown site"),
    (lambda: faults.ratelimit(TOPO, "a", "b", "fast"), ValueError, "tc rate"),
    (lambda: faults.ratelimit(TOPO, "a", "b", "10 mbit"), ValueError, "tc rate"),
    (lambda: faults.isolate(TOPO, "hv-z9"), TopologyError, "unknown host"),
])
def test_bad_fault_requests_are_refused(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("bytes_per_s, text", [
    (125_000, "1mbit"), (8_000, "64kbit"), (125_000_000, "1gbit"), (100, "800bit"),
])
def test_rates_read_back_from_tc_in_tc_units(bytes_per_s, text):
    assert faults._format_rate(bytes_per_s) == text


def test_describe_is_readable():
    assert faults.describe({"fault": "partition", "sites": ["a", "b"]}) == "partition a <-> b"
    assert (faults.describe({"fault": "partition", "sites": ["a", "b"], "networks": "replication"})
            == "partition a <-> b (replication networks)")


def test_a_replication_partition_names_only_the_replication_veths():
    ports = faults._ports(TOPO, "b", replication_only=True)
    repl = [h.veth(n) for h in TOPO.hosts_in("b") for n in h.nics if n.network.name.startswith("repl")]
    assert repl and ports == "{ " + ", ".join(f'"{p}"' for p in repl) + " }"
    assert len(faults._ports(TOPO, "b").split(",")) > len(repl)
    assert faults.describe({"fault": "loss", "sites": ["a", "c"], "percent": 30}) == "loss a <-> c 30%"
    assert faults.describe({"fault": "crashed", "host": "cp-a"}) == "crashed cp-a"
