"""Run a tandem.dr module against a case table; mocked only at `AnsibleModule.run_command`.

A case (YAML, tests/unit/module_cases/<module>.yml):

    - id: primary-when-secondary          # test id
      params: {name: web01, role: primary}  # module args; check_mode: true / diff: true too
      calls:                               # the tandemctl calls, in order, exactly
        - cmd: primary web01 --json        # after `tandemctl --socket <socket>`; str (split on
                                           # spaces) or list; "*" matches any one argument
          rc: 0                            # default 0
          out: {...}                       # stdout: a dict/list is dumped as JSON
          err: ""                          # stderr
      expect:                              # keys of the result that must be equal
        changed: true
        commands: [primary web01 --json]   # same short form as cmd
      failed: true                         # the module must fail (then expect.msg etc.)
      files: {name: text}                  # files made under {tmp} before the run
      pre_modes: {name: "0600"}             # and their modes
      expect_files: {name: text or null}   # their content afterwards (null = must not exist)
      expect_modes: {name: "0644"}          # and modes

"{tmp}" in params, texts and expectations is the test's temporary directory; "{star}" in
out/err is what the last "*" matched.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import yaml
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

CASES = Path(__file__).parent / "module_cases"
TANDEMCTL = "tandemctl"
SOCKET = "/run/tandem/tandemd.sock"


class Exit(Exception):
    def __init__(self, result, failed):
        super().__init__(result.get("msg", ""))
        self.result, self.failed = result, failed


def load(module_name):
    cases = yaml.safe_load((CASES / f"{module_name}.yml").read_text(encoding="utf-8"))
    return [pytest.param(c, id=c["id"]) for c in cases if isinstance(c, dict) and "id" in c]


def _subst(value, tmp):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, list):
        return [_subst(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, tmp) for k, v in value.items()}
    return value


def argv(short, socket=SOCKET, tandemctl=TANDEMCTL):
    args = short.split(" ") if isinstance(short, str) else list(short)
    return [tandemctl, "--socket", socket, *args]


class FakeTandemctl:
    def __init__(self, calls, tmp, socket, tandemctl):
        self.expected = list(calls or [])
        self.tmp, self.socket, self.tandemctl = tmp, socket, tandemctl
        self.seen = []

    def __call__(self, module_self, args, **kwargs):
        assert kwargs.get("check_rc") is False
        self.seen.append(list(args))
        assert self.expected, f"unexpected tandemctl call {args}"
        call = self.expected.pop(0)
        want = _subst(argv(call["cmd"], self.socket, self.tandemctl), self.tmp)
        assert len(args) == len(want), f"call {len(self.seen)}: {args} != {want}"
        star = None
        for got, exp in zip(args, want, strict=True):
            if exp == "*":
                star = got
            else:
                assert got == exp, f"call {len(self.seen)}: {args} != {want}"
        out, err = call.get("out", ""), call.get("err", "")
        if not isinstance(out, str):
            out = json.dumps(out)
        out, err = _subst(out, self.tmp), _subst(err, self.tmp)
        if star is not None:
            out, err = out.replace("{star}", star), err.replace("{star}", star)
        if "side_effect" in call:            # e.g. a file the engine would leave behind
            for name, text in call["side_effect"].items():
                Path(self.tmp, name).write_text(text)
        return call.get("rc", 0), out, err


def run_case(module_name, case, tmp_path, monkeypatch):
    tmp = tmp_path
    for name, text in (case.get("files") or {}).items():
        path = Path(tmp, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_subst(text, tmp))
    for name, mode in (case.get("pre_modes") or {}).items():
        os.chmod(Path(tmp, name), int(mode, 8))
    params = _subst(dict(case.get("params") or {}), tmp)
    check_mode = params.pop("check_mode", False)
    diff = params.pop("diff", False)
    socket = params.get("socket", SOCKET)
    tandemctl = params.get("tandemctl", TANDEMCTL)
    fake = FakeTandemctl(case.get("calls"), tmp, socket, tandemctl)

    def run_command(self, args, **kwargs):
        return fake(self, args, **kwargs)

    monkeypatch.setattr(basic.AnsibleModule, "run_command", run_command)

    def exit_json(self, **kwargs):
        raise Exit(kwargs, False)

    def fail_json(self, **kwargs):
        raise Exit(kwargs, True)

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)
    module = importlib.import_module(f"ansible_collections.tandem.dr.plugins.modules.{module_name}")
    args = {**params, "_ansible_check_mode": check_mode, "_ansible_diff": diff}
    with patch_module_args(args), pytest.raises(Exit) as info:
        module.main()
    result, failed = info.value.result, info.value.failed
    assert failed == bool(case.get("failed")), f"failed={failed}: {result}"
    assert not fake.expected, f"tandemctl calls not made: {fake.expected}"
    for key, want in _subst(case.get("expect") or {}, tmp).items():
        got = result.get(key)
        if key == "commands":
            want = [argv(c, socket, tandemctl) for c in want]
        if key == "msg_contains":
            assert want in result["msg"], result["msg"]
            continue
        if key == "resource_keys":           # a subset of the returned resource
            for k, v in want.items():
                assert result["resource"][k] == v, (k, result["resource"])
            continue
        assert got == want, f"{key}: {got!r} != {want!r}\nresult: {result}"
    for name, text in _subst(case.get("expect_files") or {}, tmp).items():
        path = Path(tmp, name)
        if text is None:
            assert not os.path.lexists(path), f"{path} exists"
        else:
            assert path.read_text() == text, f"{path}:\n{path.read_text()}"
    for name, mode in (case.get("expect_modes") or {}).items():
        assert oct(os.stat(Path(tmp, name)).st_mode & 0o7777) == oct(int(mode, 8)), name
    return result
