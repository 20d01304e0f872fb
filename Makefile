# Tandem DR -- the tandem.dr Ansible collection, its services and its lab.
#
#   make test    everything CI runs: lint, sanity, unit, engine, center and lab tests
#   make demo    bring the lab up and run the demo
#
# Run as root on Debian 12 (the lab uses LXC, bridges and nft). `make help` lists the rest.

.DEFAULT_GOAL := help

include mk/toolchain.mk
include mk/lab.mk
include mk/bench.mk
include mk/package.mk
include mk/docs.mk

# bench's recipes are in mk/bench.mk; they need fio/nbdkit and the venv.
bench bench-faults: engine-deps $(VENV_STAMP)
test-unit: engine-deps

.PHONY: help test test-lab test-engine test-center engine-deps soak molecule test-guest test-convert test-center-lab demo demo-down clean

# Real NBD clients and servers the engine tests and benchmarks use; mkfs.xfs for the
# reflink recovery point tests (an XFS with reflink=1 on a loop device); ping for the
# tandem_health unit tests; PostgreSQL 15 for the tandem-center tests (a throwaway cluster
# per session, tests/center/conftest.py); headless Chromium for the dashboard's browser test
# (tests/center/test_dashboard_browser.py); a pg_auto_failover monitor and `ip` (network
# namespaces) for the control-plane alert tests (tests/center/test_cp_*.py). Unit tests need them too.
ENGINE_TEST_PACKAGES := libnbd-bin nbdkit qemu-utils fio xfsprogs iputils-ping postgresql-15 chromium \
	postgresql-15-auto-failover pg-auto-failover-cli iproute2

help:
	@echo "make test        lint, ansible-test sanity, then unit + engine + center + lab tests (pytest)"
	@echo "make molecule    the roles' molecule scenarios on the lab (opt-in, ~12 min)"
	@echo "make test-guest  the lab guest's boot-time figures (opt-in)"
	@echo "make test-convert  an existing VM converted to tandemd, failed over with re-IP and back (opt-in)"
	@echo "make test-center-lab  tandem-center deployed behind the VIP, and its failover (opt-in)"
	@echo "make test-unit   unit tests only (no root, no lab)"
	@echo "make test-lab    lab tests only (brings the lab up itself)"
	@echo "make test-engine engine tests: two real tandemd on loopback, kill -9 test"
	@echo "make test-center tandem-center tests: real PostgreSQL 15, live server, schemathesis"
	@echo "make soak        the kill test with 500 iterations (TANDEM_KILL_ITERATIONS)"
	@echo "make bench       NBD write-path benchmark (fio; ~15 min)"
	@echo "make bench-faults link-cut figures: write stall, time back to sync, resync bytes"
	@echo "make lint        ruff and ansible-lint --offline"
	@echo "make sanity      ansible-test sanity (offline)"
	@echo "make demo        bring the lab up and run the whole DR story on it (lab/tandem_lab/demo.py)"
	@echo "make docs-reference  regenerate docs/reference/ (a page per module, filter and role)"
	@echo "make changelog   lint the changelog fragments, write CHANGELOG.rst (unreleased changes)"
	@echo "make collection  build dist/tandem-dr-VERSION.tar.gz; make ee-context: the AWX EE build context"
	@echo "make lab-up / lab-down / lab-status / lab-up-xfs / lab-clean-cache"
	@echo "make lab-guest-image  build the lab guest (Debian kernel + busybox initramfs)"

# The last step is one pytest run over unit and lab tests, so `make test` ends
# with pytest's summary line and fails if anything failed. --durations: the 30 slowest
# tests, to keep the whole under its 45-minute budget.
test: lint sanity engine-deps lab-up collections
	PYTHONPATH='$(COLLECTIONS_DIR)' PATH='$(abspath $(VENV_BIN))':"$$PATH" \
	    '$(VENV_PYTHON)' -m pytest --durations=30 $(PYTEST_ARGS) tests/unit tests/engine tests/center tests/lab

test-engine: engine-deps $(VENV_STAMP)
	'$(VENV_PYTHON)' -m pytest $(PYTEST_ARGS) tests/engine

test-center: engine-deps $(VENV_STAMP)
	'$(VENV_PYTHON)' -m pytest $(PYTEST_ARGS) tests/center

soak: engine-deps $(VENV_STAMP)
	TANDEM_KILL_ITERATIONS=$${TANDEM_KILL_ITERATIONS:-500} '$(VENV_PYTHON)' -m pytest $(PYTEST_ARGS) tests/engine/test_kill.py

engine-deps:
	@APT_EXTRA=--no-install-recommends bash ci/apt-ensure.sh 'engine tests' $(ENGINE_TEST_PACKAGES)

test-lab: lab-deps collections
	PYTHONPATH='$(COLLECTIONS_DIR)' PATH='$(abspath $(VENV_BIN))':"$$PATH" \
	    '$(VENV_PYTHON)' -m pytest -m lab $(PYTEST_ARGS) tests/lab

demo: lab-up collections
	PATH='$(abspath $(VENV_BIN))':"$$PATH" '$(VENV_PYTHON)' lab/tandem_lab/demo.py

demo-down: lab-down

# Opt-in lab runs, kept out of `make test` for its time budget.
molecule: lab-deps collections
	TANDEM_MOLECULE=1 PYTHONPATH='$(COLLECTIONS_DIR)' PATH='$(abspath $(VENV_BIN))':"$$PATH" \
	    '$(VENV_PYTHON)' -m pytest -m lab $(PYTEST_ARGS) tests/lab/test_molecule.py
test-center-lab: lab-deps collections
	TANDEM_CENTER_LAB=1 PYTHONPATH='$(COLLECTIONS_DIR)' PATH='$(abspath $(VENV_BIN))':"$$PATH" \
	    '$(VENV_PYTHON)' -m pytest -m lab $(PYTEST_ARGS) tests/lab/test_center.py tests/lab/test_center_engines.py
test-guest: lab-deps collections
	TANDEM_GUEST_FIGURES=1 PYTHONPATH='$(COLLECTIONS_DIR)' PATH='$(abspath $(VENV_BIN))':"$$PATH" \
	    '$(VENV_PYTHON)' -m pytest -m lab $(PYTEST_ARGS) tests/lab/test_guest.py
test-convert: lab-deps collections
	TANDEM_VM_CONVERT=1 PYTHONPATH='$(COLLECTIONS_DIR)' PATH='$(abspath $(VENV_BIN))':"$$PATH" \
	    '$(VENV_PYTHON)' -m pytest -m lab $(PYTEST_ARGS) tests/lab/test_vm_convert.py

clean: toolchain-clean
