# Every target does all of its own set-up on a fresh Debian machine of this kind:
# the Debian libraries Mooncake needs, a .venv, the CPU torch pin, the project and its dev extras.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
PROFILE ?= cpu
STAMP   := $(VENV)/.installed

.PHONY: demo test test-fast lint soak setup proto clean bench bench-check gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# Mooncake's wheel links against libibverbs/librdmacm/libnuma even when it only uses TCP;
	@# the metrics tests scrape with a real Prometheus server and check with promtool; the
	@# cross-host test makes network namespaces with iproute2.
	@if ! ldconfig -p | grep -q libibverbs.so.1 || ! ldconfig -p | grep -q librdmacm.so.1 || ! ldconfig -p | grep -q libnuma.so.1 \
			|| ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v ip >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			libibverbs1 librdmacm1 libnuma1 prometheus iproute2; \
	fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(PROFILE),dev]"
	touch $(STAMP)

demo: setup
	MC_FORCE_TCP=1 $(BIN)/epd demo

# Lint and types first: ruff (rules and formatting) over the tree, mypy over common/ and services/
# (both configured in pyproject.toml).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Two pytest workers, each running one test file at a time (`--dist loadfile`): most of a test's
# time is spent waiting for service processes, so two at once take about half the time on 2
# cores. The files share nothing: services bind port 0, ids are unique per test, and the network
# namespaces are one file's own. TEST_WORKERS=0 runs everything in this process, in order.
TEST_WORKERS ?= 2

test: lint
	MC_FORCE_TCP=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# Unit tests and the in-process protocol tier: no service processes, no Mooncake; under a minute.
test-fast: setup
	MC_FORCE_TCP=1 $(BIN)/python -m pytest -q --durations=10 tests/unit tests/protocol

# The performance goals as ratios against raw Mooncake in the same run (docs/BENCHMARKS.md).
bench: setup
	MC_FORCE_TCP=1 $(BIN)/epd bench --json bench.json

# The GPU path on a CUDA host, in one command (README "Checking a GPU host"). Not `setup`: that
# would install the CPU torch pin over the host's CUDA build. Uses the host's PyTorch, installs
# only what is missing into .venv-gpu (GPU_WHEELS=DIR: from DIR only, offline), writes
# GPU_CHECK_OUT (gpu-check.json); exit 77 without a CUDA device.
gpu-check:
	bash scripts/gpu-check.sh

# Regression check (not part of `make test`): fails when a figure misses its goal by more than
# BENCH_MARGIN (relative); BENCH_FLAGS=--no-integrity checks the data path without checksums.
bench-check: setup
	MC_FORCE_TCP=1 $(BIN)/epd bench --cases single,multi,control,concurrency --check \
		--margin $${BENCH_MARGIN:-0.15} $${BENCH_FLAGS:-} --json bench-check.json

soak: setup
	MC_FORCE_TCP=1 SOAK_REQUESTS=$${SOAK_REQUESTS:-5000} $(BIN)/python -m pytest -q -s -m soak

proto: setup
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
