"""meta/runtime.yml's action groups list every module in plugins/modules/ exactly once:
`tandem` for the tandemctl modules (shared options: tandemctl, socket), `libvirt` for the
tandem_vm modules (shared option: uri), `center` for the tandem-center API modules (url, token,
TLS options), so module_defaults for a group never pass an
option a member lacks."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FQCN_PREFIX = "tandem.dr."
GROUPS = ("tandem", "libvirt", "center")
#: Modules with no connection options to share: in no group.
UNGROUPED = {"tandem_health", "tandem_drill_network"}


def _runtime():
    return yaml.safe_load((ROOT / "meta" / "runtime.yml").read_text(encoding="utf-8"))


def _module_names():
    modules = ROOT / "plugins" / "modules"
    return {p.stem for p in modules.glob("*.py") if p.stem != "__init__"}


def _group(name):
    entries = (_runtime().get("action_groups") or {}).get(name)
    assert isinstance(entries, list), f"action_groups.{name} must be a list"
    names = [e.removeprefix(FQCN_PREFIX) for e in entries if not isinstance(e, dict)]
    assert len(names) == len(set(names)), f"duplicates in action_groups.{name}: {names}"
    return set(names)


def test_every_module_is_in_exactly_one_action_group():
    groups = {g: _group(g) for g in GROUPS}
    for module in _module_names():
        homes = [g for g, members in groups.items() if module in members]
        want = 0 if module in UNGROUPED else 1
        assert len(homes) == want, f"{module} is in action groups {homes}; it belongs in {want}"


def test_every_action_group_entry_is_a_module():
    for g in GROUPS:
        stale = _group(g) - _module_names()
        assert not stale, f"not in plugins/modules/, drop from action_groups.{g}: {sorted(stale)}"


def test_groups_hold_modules_with_the_same_connection_options():
    assert all(m.startswith("tandem_vm") for m in _group("libvirt"))
    assert not any(m.startswith("tandem_vm") for m in _group("tandem"))
    assert all(m.startswith("tandem_center_") for m in _group("center"))
    assert not any(m.startswith("tandem_center_") for m in _group("tandem") | _group("libvirt"))
