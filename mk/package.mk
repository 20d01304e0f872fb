# Packaging: the collection tarball and the AWX execution environment's build context.
#
#   make collection   dist/tandem-dr-<version>.tar.gz (ansible-galaxy collection build)
#   make ee-context   awx/context/: the build context for `podman build -t tandem-dr-ee awx/context`

.PHONY: collection ee-context

COLLECTION_VERSION := $(shell sed -n 's/^version: *//p' galaxy.yml)
COLLECTION_TARBALL := dist/tandem-dr-$(COLLECTION_VERSION).tar.gz

collection: $(VENV_STAMP)
	@mkdir -p dist
	'$(VENV_BIN)/ansible-galaxy' collection build --force --output-path dist .

ee-context: collection
	@mkdir -p awx/collections
	cp '$(COLLECTION_TARBALL)' awx/collections/tandem-dr.tar.gz
	cd awx && '$(abspath $(VENV_BIN))/ansible-builder' create -f execution-environment.yml -c context
