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
