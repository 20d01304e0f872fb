#!/usr/bin/env bash
# Run `ansible-test sanity` on the collection without Docker and without the ci-files host.
#
# ansible-test needs the collection at a real (not symlinked) path .../ansible_collections/
# tandem/dr, so we sync a copy to .cache/ansible-test/ansible_collections/tandem/dr: the
# files git would track (tracked + untracked-not-ignored, so uncommitted work is tested too).
# The copy gets its own `git init` (no commit needed): ansible-test lists content files with
# `git ls-files --cached --others --exclude-standard` from the nearest .git going up, which
# would otherwise be this repo's, where .cache/ is ignored -> it would see no files at all.
# The dependency collections from .cache/collections are linked next to the copy, because
# ansible-test points ANSIBLE_COLLECTIONS_PATH at the copy's collection root only.
#
# ansible-test bootstraps pip in each test venv with get_pip_<ver>.py from the ci-files host;
# ci/get_pip_shim.py is put in its cache under that name instead (<ver> read from
# ansible-test's own python_requirements.py, so it follows ansible-core upgrades).
#
# Paths in SANITY_EXCLUDE (default: lab/ tests/lab/) are left out of the copy: the LXC lab
# and its tests are CI tooling, not collection content, and by design break collection-only
# rules (e.g. the shebang test allows `#!/usr/bin/env python` but not lab/labctl's
# `#!/usr/bin/python3`). They are linted by ruff and tested by pytest instead.
# SANITY_EXCLUDE= (empty) includes them.
#
# Env: VENV_PYTHON (default .venv/bin/python), SANITY_EXCLUDE (space-separated path
# prefixes). Args: passed to `ansible-test sanity`.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${VENV_PYTHON:-$root/.venv/bin/python}
bin=$(dirname "$py")
work=$root/.cache/ansible-test
dest=$work/ansible_collections/tandem/dr

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. sync the copy (and drop files that are gone from the source tree)
mkdir -p "$dest"
cd "$root"
exclude=${SANITY_EXCLUDE-lab/ tests/lab/ src/ tests/engine/ tests/center/ tests/unit/test_engine_ tests/unit/test_nbd_ benchmarks/}
git ls-files -z --cached --others --exclude-standard | LC_ALL=C sort -zu |
    while IFS= read -r -d '' f; do
        for x in $exclude; do [[ $f == "$x"* ]] && continue 2; done
        [[ -e $f || -L $f ]] || continue    # tracked but deleted in the work tree
        printf '%s\0' "$f"
    done > "$tmp/want"
# tar, not rsync: rsync is not on a fresh Debian machine.
tar -C . --null --no-recursion -T "$tmp/want" -cf - | tar -C "$dest" -xf -
(cd "$dest" && find . \( -path ./.git -o -path ./tests/output \) -prune -o \
    \( -type f -o -type l \) -printf '%P\0' | LC_ALL=C sort -z) > "$tmp/have"
(cd "$dest" && LC_ALL=C comm -z -23 "$tmp/have" "$tmp/want" | xargs -0 -r rm -f --)
find "$dest" -mindepth 1 -type d -empty ! -path "$dest/.git*" ! -path "$dest/tests/output*" -delete
[ -d "$dest/.git" ] || git -C "$dest" init -q

# 2. dependency collections next to the copy
if [ -d "$root/.cache/collections/ansible_collections" ]; then
    for c in "$root"/.cache/collections/ansible_collections/*/*; do
        rel=${c#"$root/.cache/collections/ansible_collections/"}
        [ "$rel" = tandem/dr ] && continue
        mkdir -p "$work/ansible_collections/${rel%/*}"
        ln -sfn "$c" "$work/ansible_collections/$rel"
    done
fi

# 3. the get-pip stand-in, under the name this ansible-test version looks for
pipver=$("$py" - <<'EOF'
import pathlib, re, ansible_test
src = pathlib.Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
print(re.search(r"pip='([0-9.]+)'", src.read_text()).group(1))
EOF
)
mkdir -p ~/.ansible/test/cache
install -m 0644 "$root/ci/get_pip_shim.py" ~/.ansible/test/cache/"get_pip_${pipver//./_}.py"

# 4. run it with the controller's Python only (one set of test venvs, cached after run 1)
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
cd "$dest"
PATH="$bin:$PATH" "$bin/ansible-test" sanity --venv --python "$pyver" "$@"
