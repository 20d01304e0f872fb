# mk/bench.mk -- `make bench`: tandemd's NBD write path against nbdkit, with fio
# (GNU make include file; see benchmarks/README.md).
#
#   include mk/bench.mk
#
# Targets:   bench          the NBD write path (fio)
#            bench-faults   link cuts through the fault proxy: stall, time back to sync, resync bytes
# Variables: BENCH_ARGS   passed to benchmarks/bench.py, e.g.
#                         make bench BENCH_ARGS='--runs 5 --targets nbdkit,standalone,proto-c'
#            BENCH_PYTHON interpreter that runs the benchmark and the daemons (.venv/bin/python)
#
# Needs fio with its nbd engine and nbdkit (Debian: apt-get install fio nbdkit).
# Takes about 12 minutes with the defaults (3 runs x 3 workloads x 5 targets).

ifndef TANDEM_BENCH_MK
TANDEM_BENCH_MK := 1

# Repo root = the directory above this file, so `make -C`/`make -f` work from anywhere.
BENCH_ROOT := $(patsubst %/,%,$(dir $(abspath $(dir $(lastword $(MAKEFILE_LIST))))))

BENCH_ARGS   ?=
BENCH_PYTHON ?= .venv/bin/python

FAULT_ARGS ?=

.PHONY: bench bench-faults

bench:
	cd '$(BENCH_ROOT)' && '$(BENCH_PYTHON)' benchmarks/bench.py $(BENCH_ARGS)

bench-faults:
	cd '$(BENCH_ROOT)' && '$(BENCH_PYTHON)' benchmarks/link_faults.py \
	    --json benchmarks/results/link_faults-$$(date +%Y%m%d-%H%M%S).json $(FAULT_ARGS)

endif
