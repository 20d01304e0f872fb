"""`tandemctl validate`: the loader's verdict on a resource directory, without the daemon."""

from __future__ import annotations

import json

import pytest

from tandem.engine import ctl

GOOD = """resource = "web01"
protocol = "C"
local_node = "a"
[[nodes]]
name = "a"
address = "127.0.0.1:7788"
[[nodes]]
name = "b"
address = "127.0.0.2:7788"
[[volumes]]
number = 0
path = "/srv/web01.img"
size = "2GiB"
"""


def run(capsys, *args):
    # --socket points nowhere: validate must not need the daemon.
    rc = ctl.main(["--socket", "/nonexistent/tandemd.sock", "validate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_valid_directory_lists_the_resources(tmp_path, capsys):
    (tmp_path / "web01.toml").write_text(GOOD)
    (tmp_path / "db01.toml").write_text(GOOD.replace("web01", "db01").replace("7788", "7789"))
    rc, out, err = run(capsys, "--config-dir", str(tmp_path), "--json")
    assert rc == 0, err
    assert json.loads(out) == {"ok": True, "resources": ["db01", "web01"]}


def test_empty_directory_is_valid(tmp_path, capsys):
    rc, out, _ = run(capsys, "--config-dir", str(tmp_path), "--json")
    assert (rc, json.loads(out)) == (0, {"ok": True, "resources": []})


def test_text_output(tmp_path, capsys):
    (tmp_path / "web01.toml").write_text(GOOD)
    rc, out, _ = run(capsys, "--config-dir", str(tmp_path))
    assert rc == 0
    assert out.strip() == f"{tmp_path}: 1 resource(s) valid: web01"


def test_invalid_file_gives_the_loaders_errors(tmp_path, capsys):
    (tmp_path / "web01.toml").write_text(GOOD.replace('size = "2GiB"', "size = 1000"))
    rc, out, err = run(capsys, "--config-dir", str(tmp_path), "--json")
    assert rc == 1
    reply = json.loads(out)
    assert reply["ok"] is False
    assert reply["errors"] == f"{tmp_path}/web01.toml: volumes[0].size: must be a multiple of 4096, got 1000"
    assert reply["problems"] == [{"source": f"{tmp_path}/web01.toml", "key": "volumes[0].size",
                                  "message": "must be a multiple of 4096, got 1000"}]
    assert err.strip() == f"tandemctl validate: {reply['errors']}"


def test_conflicts_between_files_are_found(tmp_path, capsys):
    (tmp_path / "web01.toml").write_text(GOOD)
    (tmp_path / "db01.toml").write_text(GOOD.replace('"web01"', '"db01"'))
    rc, out, _ = run(capsys, "--config-dir", str(tmp_path), "--json")
    assert rc == 1
    assert "already used by" in json.loads(out)["errors"]


def test_missing_directory(tmp_path, capsys):
    rc, out, err = run(capsys, "--config-dir", str(tmp_path / "nope"))
    assert (rc, out) == (1, "")
    assert "cannot read the directory" in err


def test_default_directory_from_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TANDEM_CONFIG_DIR", str(tmp_path))
    (tmp_path / "web01.toml").write_text(GOOD)
    # TANDEM_CONFIG_DIR is read when the parser is built, i.e. in main().
    rc, out, _ = run(capsys, "--json")
    assert (rc, json.loads(out)["resources"]) == (0, ["web01"])


@pytest.mark.parametrize("args", [["--bogus"], ["extra"]])
def test_usage_errors_exit_2(capsys, args):
    with pytest.raises(SystemExit) as e:
        ctl.main(["validate", *args])
    assert e.value.code == 2
