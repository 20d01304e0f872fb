# Documentation generated from the collection.
#
#   make docs-reference   docs/reference/: a Markdown page per module, filter and role, plus an
#                         index (ci/docs_reference.py over `ansible-doc --metadata-dump`)

.PHONY: docs-reference

docs-reference: $(VENV_STAMP) collections
	PATH='$(abspath $(VENV_BIN))':"$$PATH" '$(VENV_PYTHON)' ci/docs_reference.py --dest docs/reference
