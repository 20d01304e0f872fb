"""docs/reference/ is what `make docs-reference` generates from the collection now: a module,
filter or role whose documentation changed without regenerating the pages fails here.

The generator (ci/docs_reference.py) runs for real, through ansible-doc, into a temporary
directory; the last test changes a copy of the collection to show that the comparison sees it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference"
COLLECTIONS = ROOT / ".cache" / "collections"
GENERATOR = ROOT / "ci" / "docs_reference.py"


def generate(dest: Path, collections: Path = COLLECTIONS) -> None:
    if not (collections / "ansible_collections" / "tandem" / "dr").exists():
        pytest.fail(f"no tandem.dr under {collections}: run `make collections` first")
    # Only this collections path: `make test` also puts the checkout's collections on PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {
        "ANSIBLE_COLLECTIONS_PATH": str(collections),
        "ANSIBLE_LOCAL_TEMP": str(dest.parent / "tmp"),
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), "--dest", str(dest)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"{GENERATOR.name} failed:\n{proc.stdout}\n{proc.stderr}"


def stale_pages(generated: Path, committed: Path) -> list[str]:
    """Pages that differ, are missing from committed, or are left over in it."""
    new = {p.name: p.read_text(encoding="utf-8") for p in generated.glob("*.md")}
    old = {p.name: p.read_text(encoding="utf-8") for p in committed.glob("*.md")}
    return sorted(name for name in new.keys() | old.keys() if new.get(name) != old.get(name))


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("reference") / "pages"
    generate(dest)
    return dest


def test_committed_reference_is_up_to_date(generated):
    stale = stale_pages(generated, REFERENCE)
    assert not stale, (
        f"docs/reference/ is stale ({', '.join(stale)}): run `make docs-reference` and commit it"
    )


def test_one_page_per_module_filter_and_role_plus_an_index(generated):
    modules = {p.stem for p in (ROOT / "plugins" / "modules").glob("tandem_*.py")}
    filters = {p.stem for p in (ROOT / "plugins" / "filter").glob("*.yml")}
    roles = {p.parent.parent.name for p in (ROOT / "roles").glob("*/meta/argument_specs.yml")}
    expected = (
        {f"{m}_module.md" for m in modules}
        | {f"{f}_filter.md" for f in filters}
        | {f"{r}_role.md" for r in roles}
        | {"README.md"}
    )
    assert {p.name for p in generated.glob("*.md")} == expected
    index = (generated / "README.md").read_text(encoding="utf-8")
    for page in expected - {"README.md"}:
        assert f"]({page})" in index, f"the index does not link {page}"


def test_a_module_page_has_its_options_examples_and_return_values(generated):
    page = (generated / "tandem_role_module.md").read_text(encoding="utf-8")
    assert page.splitlines()[2] == (
        "# tandem.dr.tandem_role module -- Promote or demote a tandemd resource on this node"
    )
    # Every option of the module's argument spec, with its anchor; aliases; the markup rendered.
    for option in ("force", "name", "role", "socket", "tandemctl", "wait", "wait_interval", "wait_timeout"):
        assert f'<a id="parameter-{option}"></a>' in page
    assert "aliases: timeout" in page
    assert "O(" not in page and "C(" not in page
    assert "```yaml\n- name: Fail over web01 to this site" in page
    assert '<a id="return-commands"></a>' in page
    # Links from one page to another (a filter named in a role's option).
    role = (generated / "vm_role.md").read_text(encoding="utf-8")
    assert "[tandem.dr.protection_plan](protection_plan_filter.md)" in role
    assert '<a id="stop--parameter-tandem_vm_force_off"></a>' in role


def test_a_doc_change_without_regeneration_is_seen(tmp_path, generated):
    # A copy of the collection whose tandem_role short description changed, documented as the
    # tandem.dr found on its own collections path (the other collections are not needed).
    copy = tmp_path / "collections" / "ansible_collections" / "tandem" / "dr"
    for part in ("galaxy.yml", "meta", "plugins", "roles"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(
                src, copy / part, ignore=shutil.ignore_patterns("__pycache__", "files", "templates")
            )
        else:
            copy.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy / part)
    module = copy / "plugins" / "modules" / "tandem_role.py"
    text = module.read_text(encoding="utf-8")
    old = "short_description: Promote or demote a tandemd resource on this node"
    assert old in text
    module.write_text(text.replace(old, "short_description: Promote or demote a resource"), encoding="utf-8")
    dest = tmp_path / "pages"
    generate(dest, collections=tmp_path / "collections")
    assert stale_pages(dest, generated) == ["README.md", "tandem_role_module.md"]
