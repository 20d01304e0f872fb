#!/usr/bin/env bash
# Install the third-party collections tandem.dr depends on without Ansible Galaxy:
# take them from the `ansible` community wheel on PyPI and unzip only what we need into
# .cache/collections/ansible_collections/. Also links tandem/dr -> the repo root so that
# ANSIBLE_COLLECTIONS_PATH=.cache/collections resolves tandem.dr.* to this checkout.
# Idempotent: does nothing when the collections from the same spec are already there.
#
# Env: PIP_PYTHON      python used for `pip download` (default: python3)
#      ANSIBLE_WHEEL_SPEC  which community package to take them from (default: ansible==14.*, built for ansible-core 2.21)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
spec=${ANSIBLE_WHEEL_SPEC:-ansible==14.*}
py=${PIP_PYTHON:-python3}
wheels="$root/.cache/wheels"
dest="$root/.cache/collections"
# community.general 13 needs community.library_inventory_filtering_v1.
collections=(ansible/posix community/crypto community/general community/library_inventory_filtering_v1 community/postgresql)

mkdir -p "$dest/ansible_collections/tandem"
# tandem.dr is this repo itself (relative link, so the tree can be moved).
if [ "$(readlink "$dest/ansible_collections/tandem/dr" 2>/dev/null)" != "../../../.." ]; then
    rm -rf "$dest/ansible_collections/tandem/dr"
    ln -s ../../../.. "$dest/ansible_collections/tandem/dr"
fi

have_all() {
    [ "$(cat "$dest/.source" 2>/dev/null)" = "$spec" ] || return 1
    for c in "${collections[@]}"; do
        [ -f "$dest/ansible_collections/$c/MANIFEST.json" ] || return 1
    done
}
if have_all; then
    echo "collections: up to date ($spec)"
    exit 0
fi

# One download dir per spec, so the wheel in it is the one the spec resolved to.
wdir="$wheels/$(printf '%s' "$spec" | tr -c 'A-Za-z0-9.' '_')"
mkdir -p "$wdir"
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wdir" "$spec"
wheel=$(printf '%s\n' "$wdir"/ansible-*.whl | sort -V | tail -n1)

tmp=$(mktemp -d "$dest/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
patterns=()
for c in "${collections[@]}"; do patterns+=("ansible_collections/$c/*"); done
unzip -q "$wheel" "${patterns[@]}" -d "$tmp"
for c in "${collections[@]}"; do
    rm -rf "$dest/ansible_collections/$c"
    mkdir -p "$(dirname "$dest/ansible_collections/$c")"
    mv "$tmp/ansible_collections/$c" "$dest/ansible_collections/$c"
done
echo "$spec" > "$dest/.source"
for c in "${collections[@]}"; do
    printf 'collections: %s %s (from %s)\n' "${c/\//.}" \
        "$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["collection_info"]["version"])' \
            "$dest/ansible_collections/$c/MANIFEST.json")" "$(basename "$wheel")"
done
