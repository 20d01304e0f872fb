"""pytest imports test modules outside packages by their basename (rootdir-relative 'prepend'
mode), so two test files with one name in different directories stop the whole run at
collection ("import file mismatch"): `make test` collects tests/unit, engine, center and lab
together. Catch it here, with the names, before CI does."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique_outside_packages():
    by_name = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        if "output" in path.relative_to(TESTS).parts or (path.parent / "__init__.py").exists():
            continue
        by_name[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, f"rename one of each: {clashes}"
