#!/usr/bin/env bash
# Install the Debian packages that are missing, and only those (no apt run when
# everything is there). Shared by the lab and engine-test make targets.
#
#   ci/apt-ensure.sh LABEL PACKAGE...        APT_EXTRA: extra apt-get install options
set -euo pipefail
label=$1; shift
missing=()
for p in "$@"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "$label: installing ${missing[*]}"
apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null
# shellcheck disable=SC2086  # APT_EXTRA is a list of options
DEBIAN_FRONTEND=noninteractive apt-get install -y -q ${APT_EXTRA:-} \
    -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
