"""meta/runtime.yml's `tandem` action group lists exactly the modules in plugins/modules/."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FQCN_PREFIX = "tandem.dr."


def _runtime():
    return yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text(encoding="utf-8"))


def _module_names():
    modules = ROOT / "plugins" / "modules"
    if not modules.is_dir():
        return set()
    return {p.stem for p in modules.glob("*.py") if p.stem != "__init__"}


def _action_group():
    entries = (_runtime().get("action_groups") or {}).get("tandem")
    assert isinstance(entries, list), "action_groups.tandem must be a list"
    names = []
    for entry in entries:
        if isinstance(entry, dict):  # e.g. {metadata: {extend_group: [...]}}
            continue
        names.append(entry.removeprefix(FQCN_PREFIX))
    assert len(names) == len(set(names)), f"duplicates in action_groups.tandem: {names}"
    return set(names)


def test_every_module_is_in_the_action_group():
    missing = _module_names() - _action_group()
    assert not missing, f"add to meta/runtime.yml action_groups.tandem: {sorted(missing)}"


def test_every_action_group_entry_is_a_module():
    stale = _action_group() - _module_names()
    assert not stale, f"not in plugins/modules/, drop from action_groups.tandem: {sorted(stale)}"
