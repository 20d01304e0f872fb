#!/usr/bin/env bash
# Write CHANGELOG.rst with the changes not released yet: what `antsibull-changelog release`
# would write for the version in galaxy.yml, made in a temporary copy so that the fragments
# stay in changelogs/fragments/ and changelogs/changelog.yaml records no release. (A real
# release is `antsibull-changelog release` in the checkout, which consumes the fragments.)
#
# The copy holds what antsibull-changelog reads: galaxy.yml, changelogs/, and the plugins and
# roles whose short descriptions it lists under "New Plugins" / "New Roles" (through
# ansible-doc). Files git would track, so uncommitted fragments count too.
#
# Env: VENV_BIN (default .venv/bin).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${VENV_BIN:-$root/.venv/bin}
bin=$(cd "$bin" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cd "$root"
git ls-files -z --cached --others --exclude-standard |
    grep -z -E '^(galaxy\.yml|meta/|plugins/|roles/|playbooks/|changelogs/)' |
    while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
    tar --null --no-recursion -T - -cf - | tar -C "$tmp" -xf -

version=$(sed -n 's/^version: *//p' galaxy.yml)
cat > "$tmp/changelogs/fragments/0-unreleased.yml" <<SUMMARY
---
release_summary: |
  Not released yet. These are the changes in \`\`changelogs/fragments/\`\` for the next release,
  ${version}; \`\`make changelog\`\` regenerates this file, \`\`antsibull-changelog release\`\` cuts the
  release.
SUMMARY
(cd "$tmp" && PATH="$bin:$PATH" "$bin/antsibull-changelog" release --version "$version" \
    --date "$(date -u +%F)")
cp "$tmp/CHANGELOG.rst" "$root/CHANGELOG.rst"
echo "CHANGELOG.rst: the unreleased changes of ${version} ($(find changelogs/fragments -name "*.yml" | wc -l) fragments)"
