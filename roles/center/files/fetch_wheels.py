"""Fetch the wheels of tandem-center's dependencies for the control nodes, on the controller.

Run by tasks/install.yml with the controller's Python (ansible_playbook_python):

    python fetch_wheels.py --source COLLECTION_ROOT --cache DIR --python-version 3.11 \
        --platform manylinux2014_x86_64 [--index-url URL]

- The requirements are the `center` extra of the collection's pyproject.toml.
- Binary wheels only, for the hosts' Python and platform, not the controller's.
- The download goes to DIR/<key>, key = a hash of the requirements, Python version and
  platform; a complete directory (marked by .complete) is reused without asking the index, so
  later runs work offline and push the same files (no change on the hosts).
- Prints one JSON object: {"dir": ..., "wheels": [names], "downloaded": bool}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tomllib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--python-version", required=True)
    parser.add_argument("--platform", required=True)
    parser.add_argument("--index-url", default="")
    args = parser.parse_args()

    with open(os.path.join(args.source, "pyproject.toml"), "rb") as f:
        requirements = sorted(tomllib.load(f)["project"]["optional-dependencies"]["center"])
    spec = json.dumps([requirements, args.python_version, args.platform])
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    dest = os.path.abspath(os.path.join(args.cache, key))
    downloaded = False
    if not os.path.exists(os.path.join(dest, ".complete")):
        os.makedirs(dest, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
               "--only-binary=:all:", "--python-version", args.python_version, "--platform", args.platform,
               "--implementation", "cp", "--dest", dest, *requirements]
        if args.index_url:
            cmd += ["--index-url", args.index_url]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + f"\n{' '.join(cmd)} failed with rc {proc.returncode}\n")
            return 1
        with open(os.path.join(dest, ".complete"), "w"):
            pass
        downloaded = True
    wheels = sorted(n for n in os.listdir(dest) if n.endswith(".whl"))
    print(json.dumps({"dir": dest, "wheels": wheels, "downloaded": downloaded}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
