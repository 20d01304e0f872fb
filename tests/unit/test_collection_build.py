"""The collection tarball: what `ansible-galaxy collection build` ships, and that the installed
collection works without the checkout (issue 9). The execution environment definition is
checked with `ansible-builder create` and the introspection script it runs in the image build.

The build runs on a copy of the tracked files plus decoys of what playbooks and tests leave
next to an inventory (secrets, keys), so a missing build_ignore entry fails here, not in a
user's AWX.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GALAXY = yaml.safe_load((ROOT / "galaxy.yml").read_text(encoding="utf-8"))
TARBALL = f"{GALAXY['namespace']}-{GALAXY['name']}-{GALAXY['version']}.tar.gz"
#: Deps (ansible.posix, community.*) from `make collections`; tandem/dr there is a link to the
#: checkout, so the installed copy must come first in the search path.
DEPS = ROOT / ".cache" / "collections"

DECOYS = (
    "inventories/site/tandem-secrets/vm01.key",
    "inventories/site/pki/ca.key",
    "inventories/site/tandem-runs/failover-x.json",
    "inventories/lab/hosts.yml",
    ".hypothesis/examples/x",
    "tests/output/run.json",
    "benchmarks/results/run.json",
    "dist/old.tar.gz",
)


def _run(argv, cwd, **env):
    # Not the checkout's collections: `make test` puts them on PYTHONPATH, where ansible-galaxy
    # would find tandem.dr "already installed" and install nothing.
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ANSIBLE_COLLECTIONS_PATH")}
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
                          env={**base, "ANSIBLE_NOCOLOR": "1", **env})
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).exists()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The tarball built from a copy of the tracked files plus the decoys."""
    src = tmp_path_factory.mktemp("checkout")
    for rel in _tracked():
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst, follow_symlinks=False)
    for rel in DECOYS:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("decoy\n")
    out = tmp_path_factory.mktemp("dist")
    _run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(out), str(src)], src)
    return out / TARBALL


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("collections")
    _run([str(BIN / "ansible-galaxy"), "collection", "install", "--no-deps", "--force", "-p", str(path),
          str(built)], path)
    return path


def test_the_tarball_ships_tracked_files_only(built):
    with tarfile.open(built) as tar:
        files = {m.name for m in tar.getmembers() if m.isfile()} - {"MANIFEST.json", "FILES.json"}
    leaked = sorted(files - set(_tracked()))
    assert not leaked, f"untracked files in the tarball: {leaked}"
    for needed in ("plugins/modules/tandem_resource.py", "roles/engine/meta/argument_specs.yml",
                   "playbooks/failover.yml", "src/tandem/engine/daemon.py", "pyproject.toml",
                   "meta/execution-environment.yml", "requirements.txt", "bindep.txt"):
        assert needed in files


def _ansible_env(installed: Path) -> dict[str, str]:
    return {"ANSIBLE_COLLECTIONS_PATH": f"{installed}{os.pathsep}{DEPS}",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def test_the_installed_collection_documents_every_module_and_filter(installed, tmp_path):
    env = _ansible_env(installed)
    root = installed / "ansible_collections" / "tandem" / "dr"
    modules = sorted(p.stem for p in (root / "plugins" / "modules").glob("tandem_*.py"))
    assert modules
    docs = json.loads(_run([str(BIN / "ansible-doc"), "-t", "module", "--json",
                            *[f"tandem.dr.{m}" for m in modules]], tmp_path, **env).stdout)
    for m in modules:
        # Resolved from the installed copy, not from the checkout the deps path links to.
        assert docs[f"tandem.dr.{m}"]["doc"]["filename"].startswith(str(installed)), m
    filters = json.loads(_run([str(BIN / "ansible-doc"), "-t", "filter", "--list", "--json", "tandem.dr"],
                              tmp_path, **env).stdout)
    assert "tandem.dr.protection_plan" in filters


def test_every_playbook_parses_from_the_installed_collection(installed, tmp_path):
    env = _ansible_env(installed)
    playbooks = sorted(p.stem for p in (ROOT / "playbooks").glob("*.yml"))
    inventory = ROOT / "inventories" / "example" / "hosts.yml"
    for name in playbooks:
        _run([str(BIN / "ansible-playbook"), "-i", str(inventory), "--syntax-check", f"tandem.dr.{name}"],
             tmp_path, **env)


def test_the_execution_environment_definition_builds_a_context(built, tmp_path):
    """`ansible-builder create` accepts the definition; the image's galaxy stage installs the
    tarball from the path awx/requirements.yml names; the introspection the image build runs
    reads our meta/execution-environment.yml and finds our Python and system packages."""
    work = tmp_path / "awx"
    shutil.copytree(ROOT / "awx", work, ignore=shutil.ignore_patterns("collections", "context"))
    (work / "collections").mkdir()
    shutil.copy(built, work / "collections" / "tandem-dr.tar.gz")
    _run([str(BIN / "ansible-builder"), "create", "-f", "execution-environment.yml", "-c", "context"], work)
    build = work / "context" / "_build"
    assert (build / "collections" / "tandem-dr.tar.gz").is_file()
    # What the galaxy stage runs, from /build (here: _build), minus the dependency downloads.
    dest = tmp_path / "image-collections"
    _run([str(BIN / "ansible-galaxy"), "collection", "install", "--no-deps", "--force",
          "-r", "requirements.yml", "-p", str(dest)], build)
    _run([sys.executable, str(build / "scripts" / "introspect.py"), "introspect",
          "--write-pip", str(tmp_path / "pip.txt"), "--write-bindep", str(tmp_path / "bindep.txt"),
          str(dest)], tmp_path)
    pip = (tmp_path / "pip.txt").read_text()
    bindep = (tmp_path / "bindep.txt").read_text()
    assert "netaddr" in pip and "cryptography" in pip, pip
    assert "openssh-clients [platform:rpm]" in bindep, bindep
