"""Offline stand-in for ansible-test's get-pip bootstrap (ci-files host is unreachable).

ansible-test runs ``python get_pip_X_Y.py [pip install args] --no-setuptools --no-wheel``
in each new venv. We put pip into the venv from the interpreter's bundled wheel
(ensurepip, in a child process because it forces PIP_CONFIG_FILE=/dev/null), then
``pip install`` the requested packages with the machine's normal pip configuration
(PIP_CONFIG_FILE removed from the environment). get-pip's own options are dropped.
"""

import os
import subprocess
import sys

GET_PIP_ONLY = {"--no-setuptools", "--no-wheel"}

subprocess.run([sys.executable, "-m", "ensurepip", "--upgrade"], check=True)
env = {k: v for k, v in os.environ.items() if k != "PIP_CONFIG_FILE"}
args = [a for a in sys.argv[1:] if a not in GET_PIP_ONLY]
pip = subprocess.run([sys.executable, "-m", "pip", "install", *args], env=env, check=False)
sys.exit(pip.returncode)
