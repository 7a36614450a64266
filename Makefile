# The two commands of the README: `make bench` (the main job) and `make test`.
# Each creates .venv on first use (torch 2.14.1 from the local wheel store, the
# test tools, lightly's loss as a baseline) and installs this package into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.14.1
LIGHTLY_VERSION ?= 1.6.0

DEPS_STAMP := $(VENV)/.deps-stamp
INSTALL_STAMP := $(VENV)/.install-stamp
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: install spill-check test bench demo bench-regress checkstyle clean

$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==$(TORCH_VERSION) -r requirements-dev.txt
	# lightly's MACLLoss is a baseline; --no-deps keeps torchvision and friends out.
	$(PIP) install --quiet --no-deps lightly==$(LIGHTLY_VERSION)
	touch $@

# The extension (setup.py): the C++ CPU ops, and the CUDA kernels, forced in so that
# they are compiled and linked (not run) on a machine without a GPU too. The compiler
# output, ptxas's resource report included, goes to $(BUILD_LOG).
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
MACL_KERNELS_FORCE_CUDA ?= 1
export CUDA_HOME MACL_KERNELS_FORCE_CUDA
BUILD_LOG := build/build.log

$(INSTALL_STAMP): $(DEPS_STAMP) $(SOURCES)
	mkdir -p build
	$(PIP) install -v --no-build-isolation --no-deps -e . > $(BUILD_LOG) 2>&1 || { tail -n 60 $(BUILD_LOG); exit 1; }
	touch $@

install: $(INSTALL_STAMP)

# Every CUDA kernel on sm_90 must show 0 bytes of register spills (tools/check_spills.py).
spill-check: install
	$(PY) tools/check_spills.py --arch 90 --log build/ptxas-sm_90.log

test: install spill-check
	$(PY) -m pytest

# BENCH_ARGS: e.g. "--out benchmarks/results" for the committed copy, "--sizes 8192" for one size.
bench: install
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# SimCLR on sklearn's digits (MACL vs NT-Xent), training steps at batch sizes up to 32768 (fused vs
# dense loss), then a convolutional encoder up to 65536 pairs with and without GradCache.
demo: install
	$(PY) -m benchmarks.demo

# Small per-backend speed regressions (pytest-benchmark): each run is saved under
# .benchmarks/ and compared with the previous one.
bench-regress: install
	$(PY) -m pytest benchmarks/test_regressions.py --benchmark-autosave --benchmark-compare \
		--benchmark-sort=name --benchmark-columns=median,iqr,rounds

checkstyle: install
	$(VENV)/bin/ruff check macl_kernels python_tests benchmarks
	$(VENV)/bin/ruff format --check macl_kernels python_tests benchmarks

clean:
	rm -rf build *.egg-info macl_kernels/*.so $(INSTALL_STAMP)
