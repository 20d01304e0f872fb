"""The version of the collection, the Python package and the code agree."""

import tomllib
from pathlib import Path

import yaml

import tandem

ROOT = Path(__file__).resolve().parents[2]


def test_version_matches_galaxy_yml():
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text(encoding="utf-8"))
    assert tandem.__version__ == str(galaxy["version"])


def test_version_matches_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert tandem.__version__ == pyproject["project"]["version"]


def test_engine_has_no_runtime_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"].get("dependencies", []) == []


def test_the_center_libraries_are_an_extra_the_engine_never_imports():
    """tandem-center's libraries come with `tandem[center]`; importing every engine module pulls
    none of them (nor tandem.center) in, so the engine wheel runs on a bare Python."""
    import pkgutil
    import re
    import subprocess
    import sys

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extra = pyproject["project"]["optional-dependencies"]["center"]
    assert {"fastapi", "uvicorn", "psycopg-pool"} <= {re.split(r"[<>=\[]", d)[0] for d in extra}
    engine = [m.name for m in pkgutil.iter_modules([str(ROOT / "src" / "tandem" / "engine")])]
    banned = ("fastapi", "starlette", "pydantic", "uvicorn", "psycopg", "psycopg_pool")
    code = ("import sys\n" + "".join(f"import tandem.engine.{m}\n" for m in engine) +
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {banned!r} or m == 'tandem.center'))")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT / "src")},
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert len(engine) > 10 and out.strip() == "[]"
