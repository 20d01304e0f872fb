"""tandem.dr module_utils: sizes, tunables, status, the TOML renderer (round-tripped through the
engine's own loader), the tandemctl vocabulary (parsed by the real tandemctl parser), waiting."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from ansible_collections.tandem.dr.plugins.module_utils import _parse, _tandemctl, _wait
from ansible_collections.tandem.dr.plugins.module_utils._errors import WaitTimeout
from tandem.engine import config, ctl

# -- sizes and tunables ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 4096, 2147483648, "2GiB", "2048M", "2 G", "512 M", "4096", " 1K ",
                                   "3TiB", "7T", "1KiB"])
def test_parse_size_agrees_with_the_engine(value):
    assert _parse.parse_size(value) == config.parse_size(value)


def test_sizes_of_one_meaning_are_equal():
    assert _parse.parse_size("2GiB") == _parse.parse_size("2048M") == _parse.parse_size(2 << 30)


@pytest.mark.parametrize("value", ["1.5G", "2GB", "2 gib", "", "G", "-1", True, 1.0, None, [1]])
def test_parse_size_refuses_what_the_engine_refuses(value):
    with pytest.raises(ValueError):
        _parse.parse_size(value)
    with pytest.raises((ValueError, TypeError)):
        config.parse_size(value)


def test_tunable_units_match_the_engine():
    assert {name: spec.unit for name, spec in config.TUNABLES.items()} == _parse.TUNABLE_UNITS


@pytest.mark.parametrize(("name", "value", "canonical"), [
    ("congestion_fill", "64MiB", 64 << 20), ("congestion_fill", 67108864, 64 << 20),
    ("resync_rate_max", "200M", 200 << 20), ("resync_rate_max", 0, 0),
    ("sync_timeout", 1, 1.0), ("sync_timeout", "0.5", 0.5), ("rp_interval", 3600, 3600.0),
    ("rp_keep", "48", 48), ("al_extents", 1237, 1237),
    # left alone: the loader reports them in its own words
    ("congestion_fill", "1.5G", "1.5G"), ("sync_timeout", True, True), ("rp_keep", 1.5, 1.5),
    ("sync_timout", "1", "1"),
])
def test_normalize_tunable(name, value, canonical):
    got = _parse.normalize_tunable(name, value)
    assert got == canonical and type(got) is type(canonical)


# -- status ---------------------------------------------------------------------------------------

def _vol(**kw):
    return {"volume": 0, "disk": "UpToDate", "peer_disk": "UpToDate", "replication": "Established",
            "out_of_sync_bytes": 0, **kw}


@pytest.mark.parametrize(("status", "expected"), [
    ({"connection": "Connected", "volumes": [_vol(), _vol(volume=1)]}, True),
    ({"connection": "Connecting", "volumes": [_vol()]}, False),
    ({"connection": "StandAlone", "volumes": [_vol()]}, False),
    ({"connection": "Connected", "volumes": [_vol(), _vol(out_of_sync_bytes=4096)]}, False),
    ({"connection": "Connected", "volumes": [_vol(replication="SyncSource")]}, False),
    ({"connection": "Connected", "volumes": [_vol(peer_disk="Inconsistent")]}, False),
    ({"connection": "Connected", "volumes": [_vol(disk="Outdated")]}, False),
    (None, False),
])
def test_in_sync(status, expected):
    assert _parse.in_sync(status) is expected


def test_engine_state_names():
    from tandem.engine import resource
    assert (_parse.CONNECTED, _parse.STANDALONE, _parse.CONNECTING) == \
        (resource.CONNECTED, resource.STANDALONE, resource.CONNECTING)
    assert (_parse.UPTODATE, _parse.ESTABLISHED) == (resource.UPTODATE, resource.ESTABLISHED)


def test_normalize_status_adds_and_keeps():
    st = {"name": "x", "connection": "Connected",
          "volumes": [_vol(out_of_sync_bytes=1), _vol(out_of_sync_bytes=2)]}
    out = _parse.normalize_status(st)
    assert out == {**st, "in_sync": False, "out_of_sync_bytes": 3}
    assert "in_sync" not in st


# -- the renderer, through the engine's loader ------------------------------------------------------

DESIRED = {
    "name": "web01", "protocol": "A", "local_node": "hv-b1",
    "nodes": [{"name": "hv-a1", "address": "10.0.0.1:7788"}, {"name": "hv-b1", "address": "[fd00::11]:7789"}],
    "volumes": [{"path": "/srv/tandem/web01/disk0.img", "size": "2GiB", "export": "web01/disk0",
                 "metadata": None},
                {"path": '/srv/we"ird\\ päth/d1.img', "size": 4096, "export": None,
                 "metadata": "/var/lib/tandem/md/web01-1.md"}],
    "tunables": {"congestion_fill": "64MiB", "sync_timeout": 2, "rp_keep": 48, "resync_rate_max": "200M",
                 "ping_timeout": 0.25},
    "nbd": {"socket": "/run/tandem/web01.sock", "tcp": "127.0.0.1:10809", "group": "kvm"},
    "security": {"tls_cert": "/etc/t/node.crt", "tls_key": None, "tls_ca": "/etc/t/ca.crt",
                 "secret_file": "/etc/t/web01.key", "plaintext": False},
    "rp_storage": "auto",
}


def _load(tmp_path, text, name="web01"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return config.load_resource(path)


def test_rendered_file_loads_and_means_what_was_asked(tmp_path):
    text = _parse.render_resource(DESIRED)
    assert text.startswith("# managed by Ansible tandem.dr.tandem_resource")
    got = _load(tmp_path, text).to_dict()
    assert got["resource"] == "web01" and got["protocol"] == "A" and got["local_node"] == "hv-b1"
    assert got["nodes"] == [{"name": "hv-a1", "address": "10.0.0.1:7788"},
                            {"name": "hv-b1", "address": "[fd00::11]:7789"}]
    assert got["volumes"] == [
        {"number": 0, "path": "/srv/tandem/web01/disk0.img", "size": 2 << 30, "export": "web01/disk0",
         "metadata": None},
        {"number": 1, "path": '/srv/we"ird\\ päth/d1.img', "size": 4096, "export": "web01/1",
         "metadata": "/var/lib/tandem/md/web01-1.md"}]
    want_tunables = config.Tunables().to_dict()
    want_tunables.update(congestion_fill=64 << 20, sync_timeout=2.0, rp_keep=48, resync_rate_max=200 << 20,
                         ping_timeout=0.25)
    assert got["tunables"] == want_tunables
    assert got["nbd"] == {"socket": "/run/tandem/web01.sock", "tcp": "127.0.0.1:10809", "group": "kvm"}
    assert got["security"] == {"tls_cert": "/etc/t/node.crt", "tls_key": config.DEFAULT_TLS_KEY,
                               "tls_ca": "/etc/t/ca.crt", "secret_file": "/etc/t/web01.key",
                               "plaintext": False}
    assert got["rp_storage"] == "auto"


def test_minimal_file_takes_the_engine_defaults(tmp_path):
    desired = {"name": "db01", "protocol": "C", "local_node": "a",
               "nodes": [{"name": "a", "address": "127.0.0.1:1"}, {"name": "b", "address": "127.0.0.2:1"}],
               "volumes": [{"path": "/dev/vg0/db01", "size": "100G"}]}
    cfg = _load(tmp_path, _parse.render_resource(desired), "db01")
    assert cfg.tunables == config.Tunables()
    assert cfg.security.secret_file == config.default_secret_file("db01")
    assert cfg.rp_storage == "delta" and cfg.nbd == config.NbdConfig()


def test_rendering_is_deterministic_and_spelling_free():
    other = {**DESIRED, "tunables": {"ping_timeout": 0.25, "resync_rate_max": 200 << 20, "rp_keep": "48",
                                     "sync_timeout": 2.0, "congestion_fill": 64 << 20},
             "volumes": [{**DESIRED["volumes"][0], "size": "2048M"}, DESIRED["volumes"][1]]}
    assert _parse.render_resource(DESIRED) == _parse.render_resource(other)


def test_bad_values_reach_the_loader_with_its_message(tmp_path):
    desired = {**DESIRED, "tunables": {"sync_timout": 1, "congestion_fill": "1.5G"}}
    with pytest.raises(config.ConfigError) as e:
        _load(tmp_path, _parse.render_resource(desired))
    assert "unknown key 'sync_timout' (did you mean 'sync_timeout'?)" in str(e.value)
    assert "tunables.congestion_fill" in str(e.value)


def test_odd_keys_and_strings_stay_valid_toml(tmp_path):
    desired = {**DESIRED, "tunables": {"a key": 1, "x.y": "\x7f\n\t\"é"}}
    with pytest.raises(config.ConfigError) as e:     # unknown keys, but a file the loader can read
        _load(tmp_path, _parse.render_resource(desired))
    assert "TOML syntax error" not in str(e.value)
    assert "unknown key 'a key'" in str(e.value)


def test_unrenderable_value():
    with pytest.raises(ValueError, match="cannot write"):
        _parse.render_resource({**DESIRED, "tunables": {"rp_keep": [1]}})


# -- the tandemctl vocabulary is tandemctl's ---------------------------------------------------------

VOCABULARY_CALLS = [
    ("status",), ("status", "web01"), ("primary", "web01"), ("primary", "web01", True),
    ("secondary", "web01"),
    ("connect", "web01"), ("disconnect", "web01"), ("verify", "web01"), ("verify", "web01", True),
    ("adjust", "web01"), ("adjust", "web01", True), ("validate", "/etc/tandem/resources.d"),
    ("rp_list", "web01"), ("rp_create", "web01", {"name": "x", "a": "b=c"}), ("rp_delete", "web01", "rp-1"),
    ("rp_label", "web01", "rp-1", {"tested": "now", "drill": ""}),
    ("rp_export", "web01", "rp-1"), ("rp_unexport", "web01", "rp-1"), ("rp_restore", "web01", "rp-1"),
    ("rp_clone", "web01", "rp-1", "drill"), ("rp_clone_delete", "web01", "drill"),
]


class _Module:
    params = {"tandemctl": "tandemctl", "socket": "/run/x/tandemd.sock"}
    check_mode = False


def _parse_with_tandemctl(argv):
    """Run tandemctl's own argument parser on argv (stops before it would talk to tandemd)."""
    seen = {}

    def stop(*args, **kwargs):
        raise _Stop

    class _Stop(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        ns = original(self, args, namespace)
        seen["ns"] = ns
        raise _Stop

    argparse.ArgumentParser.parse_args = capture
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(_Stop):
            ctl.main(argv)
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen["ns"]


@pytest.mark.parametrize("call", VOCABULARY_CALLS, ids=lambda c: "-".join(str(x) for x in c[:1] + c[2:]))
def test_every_argv_parses_with_tandemctl(call):
    verb, *args = call
    runner = _tandemctl.Tandemctl(_Module())
    argv = runner.argv(verb, *args)
    assert argv[:3] == ["tandemctl", "--socket", "/run/x/tandemd.sock"]
    ns = _parse_with_tandemctl(argv[1:])
    assert ns.socket == "/run/x/tandemd.sock"
    assert ns.json is True
    if verb.startswith("rp_"):
        assert (ns.cmd, ns.op) == ("rp", verb[3:].replace("_", "-"))
    else:
        assert ns.cmd == verb
    if verb == "rp_create":
        assert sorted(ns.label) == ["a=b=c", "name=x"]


def test_vocabulary_covers_every_tandemctl_command_the_modules_use():
    assert set(_tandemctl.VOCABULARY) == {c[0] for c in VOCABULARY_CALLS}


def test_write_is_skipped_and_recorded_in_check_mode():
    class M(_Module):
        check_mode = True

        def run_command(self, *a, **kw):
            raise AssertionError("must not run")

    runner = _tandemctl.Tandemctl(M())
    assert runner.write("disconnect", "web01") is None
    assert runner.commands == [
        ["tandemctl", "--socket", "/run/x/tandemd.sock", "disconnect", "web01", "--json"]]


def test_a_missing_binary_is_engine_unavailable():
    class M(_Module):
        def run_command(self, *a, **kw):
            raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(_tandemctl.EngineUnavailable, match="cannot run tandemctl"):
        _tandemctl.Tandemctl(M()).read("status")


def test_unexpected_exit_code():
    class M(_Module):
        def run_command(self, *a, **kw):
            return 137, "", "Killed"

    with pytest.raises(_tandemctl.TandemctlError, match="tandemctl exited with 137: Killed") as e:
        _tandemctl.Tandemctl(M()).read("status")
    assert not isinstance(e.value, (_tandemctl.EngineRefused, _tandemctl.EngineUnavailable))


# -- waiting -----------------------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_wait_returns_the_first_state_that_matches():
    clock, states = _Clock(), iter([1, 2, 3, 4])
    state, waited = _wait.wait_for(lambda: next(states), lambda s: s == 3, "three", timeout=10, interval=2,
                                   clock=clock, sleep=clock.sleep)
    assert (state, waited) == (3, 4.0)


def test_wait_timeout_names_what_and_the_last_state():
    clock = _Clock()
    with pytest.raises(WaitTimeout) as e:
        _wait.wait_for(lambda: {"role": "Secondary"}, lambda s: False, "role Primary", timeout=5, interval=2,
                       describe=lambda s: s["role"], clock=clock, sleep=clock.sleep)
    assert str(e.value) == "timed out after 5s waiting for role Primary; last seen: Secondary"
    assert e.value.last == {"role": "Secondary"} and e.value.waited == 5.0
    assert clock.now == 5.0          # the last sleep is cut to the deadline


def test_wait_reads_at_least_once_with_timeout_zero():
    calls = []
    state, waited = _wait.wait_for(lambda: calls.append(1) or "x", lambda s: True, "x", timeout=0)
    assert (state, len(calls)) == ("x", 1)
