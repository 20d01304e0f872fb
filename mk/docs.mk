# Documentation generated from the collection, and the changelog.
#
#   make docs-reference   docs/reference/: a Markdown page per module, filter and role, plus an
#                         index (ci/docs_reference.py over `ansible-doc --metadata-dump`)
#   make changelog        antsibull-changelog lint, then CHANGELOG.rst (ci/changelog.sh)

.PHONY: docs-reference

docs-reference: $(VENV_STAMP) collections
	PATH='$(abspath $(VENV_BIN))':"$$PATH" '$(VENV_PYTHON)' ci/docs_reference.py --dest docs/reference

# antsibull-changelog (config and fragments in changelogs/). `make changelog` lints the
# fragments, then writes CHANGELOG.rst with the changes not released yet (ci/changelog.sh).
.PHONY: changelog changelog-lint

changelog-lint: $(VENV_STAMP)
	'$(VENV_BIN)/antsibull-changelog' lint

changelog: changelog-lint
	VENV_BIN='$(abspath $(VENV_BIN))' bash ci/changelog.sh
