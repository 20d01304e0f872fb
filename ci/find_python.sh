#!/usr/bin/env bash
# Print the path of a Python >= 3.12 for the dev venv (ansible-core 2.21 needs it).
# Order: $PYTHON if set (must qualify); python3.13 / python3.12 on PATH (pyenv shims that
# are not activated fail to run and are skipped); /root/.pyenv/versions/3.1[2-9]*, newest
# first. Exits 1 with a how-to message on stderr when none qualifies.
set -uo pipefail

ok() {  # ok CMD -> prints the interpreter's real path if it runs and is >= 3.12
    "$1" -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null
}

if [ -n "${PYTHON:-}" ]; then
    ok "$PYTHON" && exit 0
    echo "PYTHON=$PYTHON is not a working Python >= 3.12 (ansible-core 2.21 needs one)." >&2
    exit 1
fi
mapfile -t pyenv < <(printf '%s\n' /root/.pyenv/versions/3.1[2-9]*/bin/python3 | sort -rV)
for c in python3.13 python3.12 "${pyenv[@]}"; do
    command -v "$c" >/dev/null 2>&1 && ok "$c" && exit 0
done
cat >&2 <<'MSG'
No Python >= 3.12 found (ansible-core 2.21 needs one; the system python3 is too old).
Get one, e.g. `pyenv install 3.12`, or point at it: `PYTHON=/path/to/python3.12 make test`.
MSG
exit 1
