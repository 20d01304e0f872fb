"""tandem.dr.tandem_resource, from the case table module_cases/tandem_resource.yml, and its
validate step with the engine's real tandemctl."""

import subprocess
import sys
from pathlib import Path

import pytest
from module_harness import load, run_case

from ansible_collections.tandem.dr.plugins.module_utils._errors import EngineRefused
from ansible_collections.tandem.dr.plugins.module_utils._parse import render_resource
from ansible_collections.tandem.dr.plugins.module_utils._tandemctl import Tandemctl
from ansible_collections.tandem.dr.plugins.modules import tandem_resource


@pytest.mark.parametrize("case", load("tandem_resource"))
def test_tandem_resource(case, tmp_path, monkeypatch):
    run_case("tandem_resource", case, tmp_path, monkeypatch)


# -- the validate step with the real tandemctl (no daemon needed) -----------------------------------

REAL_OTHER = """resource = "db01"
protocol = "C"
local_node = "a"
[[nodes]]
name = "a"
address = "127.0.0.1:7789"
[[nodes]]
name = "b"
address = "127.0.0.2:7789"
[[volumes]]
number = 0
path = "/srv/db01.img"
size = 4096
export = "shared/name"
"""


class _RealModule:
    """Just enough of AnsibleModule for Tandemctl, running the engine's own tandemctl."""

    check_mode = False

    def __init__(self, tandemctl):
        self.params = {"tandemctl": tandemctl, "socket": "/nonexistent/tandemd.sock"}

    def run_command(self, args, **kwargs):
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        return proc.returncode, proc.stdout, proc.stderr


def _real_tandemctl(tmp_path):
    src = Path(__file__).resolve().parents[2] / "src"
    script = tmp_path / "tandemctl"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={src} exec {sys.executable} -m tandem.engine.ctl "$@"\n')
    script.chmod(0o755)
    return str(script)


def _candidate(**volume):
    return render_resource({"name": "web01", "protocol": "C", "local_node": "a",
                            "nodes": [{"name": "a", "address": "127.0.0.1:7788"},
                                      {"name": "b", "address": "127.0.0.2:7788"}],
                            "volumes": [{"path": "/srv/web01.img", "size": "2GiB", **volume}]})


def test_validate_with_the_real_loader_names_the_real_directory(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "db01.toml").write_text(REAL_OTHER)
    (etc / "web01.toml").write_text("this file is replaced by the candidate\n")
    ctl = Tandemctl(_RealModule(_real_tandemctl(tmp_path)))
    tandem_resource.validate(None, ctl, str(etc), "web01", _candidate())          # valid: no error
    with pytest.raises(EngineRefused) as e:
        tandem_resource.validate(None, ctl, str(etc), "web01", _candidate(size=1000))
    assert str(e.value) == f"{etc}/web01.toml: volumes[0].size: must be a multiple of 4096, got 1000"
    assert "tandem-validate-" not in e.value.stdout + e.value.stderr
    with pytest.raises(EngineRefused) as e:     # the node-wide rules see the other files
        tandem_resource.validate(None, ctl, str(etc), "web01", _candidate(export="shared/name"))
    assert f"export name 'shared/name' is already used by {etc}/db01.toml" in str(e.value)
    assert "tandem-validate-" not in str(e.value) + e.value.stdout + e.value.stderr
    assert ctl.commands == []                 # validate is a read
    assert sorted(p.name for p in etc.iterdir()) == ["db01.toml", "web01.toml"]
