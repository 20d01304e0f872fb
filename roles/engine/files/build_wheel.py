"""Build the tandem engine wheel from a tandem.dr collection, on the Ansible controller.

Run by tasks/install.yml with the controller's Python (ansible_playbook_python):

    python build_wheel.py --source COLLECTION_ROOT --dest DIR

- The collection is only read: pyproject.toml, LICENSE and src/ are copied to a temporary
  directory first (setuptools writes build/ and *.egg-info next to the sources, and an
  installed collection may be read-only).
- The build is offline (--no-index, --no-build-isolation: setuptools of this Python) and
  reproducible: with SOURCE_DATE_EPOCH set, the same sources give a byte-identical wheel, so
  the copy to the hosts reports a change only when the engine really changed.
- Prints one JSON object: {"path": ..., "name": ..., "sha256": ...}.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

DEFAULT_EPOCH = "315532800"  # 1980-01-01, the earliest time a zip file can hold


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="root of the tandem.dr collection")
    parser.add_argument("--dest", required=True, help="directory the wheel is written to")
    args = parser.parse_args()

    env = dict(os.environ)
    env.setdefault("SOURCE_DATE_EPOCH", DEFAULT_EPOCH)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"

    with tempfile.TemporaryDirectory(prefix="tandem-wheel-src.") as work:
        for name in ("pyproject.toml", "LICENSE"):
            shutil.copy(os.path.join(args.source, name), os.path.join(work, name))
        shutil.copytree(os.path.join(args.source, "src"), os.path.join(work, "src"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        out = os.path.join(work, "dist")
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "--wheel-dir", out, work]
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout)
            sys.stderr.write(f"\n{' '.join(cmd)} failed with rc {proc.returncode}\n")
            return 1
        wheels = glob.glob(os.path.join(out, "*.whl"))
        if len(wheels) != 1:
            sys.stderr.write(f"expected one wheel in {out}, found {wheels}\n")
            return 1
        os.makedirs(args.dest, exist_ok=True)
        name = os.path.basename(wheels[0])
        path = os.path.join(args.dest, name)
        shutil.copyfile(wheels[0], path)

    with open(path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    print(json.dumps({"path": path, "name": name, "sha256": sha256}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
