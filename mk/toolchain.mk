# mk/toolchain.mk -- dev toolchain for the tandem.dr collection (GNU make include file).
#
#   include mk/toolchain.mk
#
# Targets:   venv  collections  lint  lint-python  lint-ansible  sanity  test-unit  toolchain-clean
# Variables: PYTHON (input: interpreter to build the venv with; optional)
#            BASE_PYTHON (resolved interpreter >= 3.12, lazily discovered)
#            VENV (.venv)  VENV_BIN  VENV_PYTHON  VENV_STAMP
#            TOOLCHAIN_ROOT  COLLECTIONS_DIR  SANITY_ARGS  SANITY_EXCLUDE  PYTEST_ARGS
#            ANSIBLE_COLLECTIONS_PATH (exported)
#
# Recipes of this file run under bash -euo pipefail (target-specific SHELL/.SHELLFLAGS, so
# recipes of other include files keep make's defaults).

ifndef TANDEM_TOOLCHAIN_MK
TANDEM_TOOLCHAIN_MK := 1

# Repo root = the directory above this file (works from `make -C`, `make -f`, includes).
TOOLCHAIN_ROOT := $(patsubst %/,%,$(dir $(abspath $(dir $(lastword $(MAKEFILE_LIST))))))

ifneq ($(CURDIR),$(TOOLCHAIN_ROOT))
$(warning mk/toolchain.mk: run make from the repo root ($(TOOLCHAIN_ROOT)), not $(CURDIR))
endif

VENV        ?= .venv
VENV_BIN    := $(VENV)/bin
VENV_PYTHON := $(VENV_BIN)/python
VENV_STAMP  := $(VENV)/.stamp
# Debian packages pip needs to build requirements-dev.txt (libvirt-python has no wheel).
VENV_BUILD_PACKAGES := libvirt-dev pkg-config gcc

# Where the offline collections (and the tandem/dr -> repo-root link) live.
COLLECTIONS_DIR := $(TOOLCHAIN_ROOT)/.cache/collections
export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS_DIR)

# BASE_PYTHON: $(PYTHON) if set (validated), else python3.13/python3.12 on PATH, else
# /root/.pyenv/versions/3.1[2-9]* newest first. Lazy + memoised: only targets that build
# the venv pay for (or fail on) the discovery; ci/find_python.sh prints how to fix it.
BASE_PYTHON = $(eval BASE_PYTHON := $(shell PYTHON='$(PYTHON)' bash '$(TOOLCHAIN_ROOT)/ci/find_python.sh'))$(BASE_PYTHON)

# Extra args, e.g. `make sanity SANITY_ARGS='--test pylint'`, `make test-unit PYTEST_ARGS=-x`.
SANITY_ARGS ?=
PYTEST_ARGS ?=
# Path prefixes kept out of the sanity copy (CI tooling, not collection content; see
# ci/sanity.sh) and the stdlib-only engine package (src/, its tests), which ruff and pytest
# check: Ansible's pylint rules for plugin code do not apply to it (nor to tandem-center's tests).
# `make sanity SANITY_EXCLUDE=` checks everything.
SANITY_EXCLUDE ?= lab/ tests/lab/ src/ tests/engine/ tests/center/ tests/unit/test_engine_ tests/unit/test_nbd_ benchmarks/

# Python trees that ruff checks (only those that exist: ruff errors on missing paths).
RUFF_PATHS = $(wildcard src tests lab plugins ci)

TOOLCHAIN_TARGETS := venv collections lint lint-python lint-ansible sanity test-unit \
                     toolchain-clean $(VENV_STAMP)
$(TOOLCHAIN_TARGETS): SHELL := /bin/bash
$(TOOLCHAIN_TARGETS): .SHELLFLAGS := -euo pipefail -c

.PHONY: venv collections lint lint-python lint-ansible sanity test-unit toolchain-clean

venv: $(VENV_STAMP)

# (Re)build the venv when the requirements or the package metadata change. An existing venv
# is reused if it was made from the same Python X.Y, else it is recreated.
$(VENV_STAMP): requirements-dev.txt pyproject.toml
	@py='$(BASE_PYTHON)'; [ -n "$$py" ] || exit 1; \
	want=$$("$$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	have=$$('$(VENV_PYTHON)' -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true); \
	if [ "$$want" != "$$have" ]; then \
	    echo "venv: creating $(VENV) with $$py ($$want)"; \
	    rm -rf '$(VENV)'; "$$py" -m venv '$(VENV)'; \
	fi
	@APT_EXTRA=--no-install-recommends bash ci/apt-ensure.sh 'venv (libvirt-python builds against libvirt)' \
	    $(VENV_BUILD_PACKAGES)
	'$(VENV_PYTHON)' -m pip install --quiet -r requirements-dev.txt -e '.[center]'
	PIP_PYTHON='$(VENV_PYTHON)' bash ci/collections.sh
	@touch '$@'

# Cheap and idempotent; also repairs .cache/ if it was removed after the venv was built.
collections: $(VENV_STAMP)
	@PIP_PYTHON='$(VENV_PYTHON)' bash ci/collections.sh >/dev/null

lint: lint-python lint-ansible

lint-python: $(VENV_STAMP)
	'$(VENV_BIN)/ruff' check $(RUFF_PATHS)

# Config in .ansible-lint (profile production, offline). PATH so ansible-lint finds
# ansible-config/ansible-galaxy of the venv.
lint-ansible: $(VENV_STAMP) collections
	PATH='$(abspath $(VENV_BIN))':"$$PATH" '$(VENV_BIN)/ansible-lint' --offline

# ansible-test sanity on a real copy of the collection (see ci/sanity.sh for why a copy).
sanity: $(VENV_STAMP) collections
	VENV_PYTHON='$(abspath $(VENV_PYTHON))' SANITY_EXCLUDE='$(SANITY_EXCLUDE)' \
	    bash ci/sanity.sh $(SANITY_ARGS)

test-unit: $(VENV_STAMP) collections
	PYTHONPATH='$(COLLECTIONS_DIR)' '$(VENV_PYTHON)' -m pytest -m 'not lab' $(PYTEST_ARGS) tests/unit

toolchain-clean:
	rm -rf '$(VENV)' .cache/ansible-test .cache/collections tests/output .ruff_cache .pytest_cache

endif # TANDEM_TOOLCHAIN_MK
