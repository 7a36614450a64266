# The two commands of the README: `make bench` (the main job) and `make test`.
# Each creates .venv on first use (torch 2.14.1 from the local wheel store, the
# test and packaging tools, lightly's loss as a baseline) and installs this
# package into it. `make wheel` builds and checks the distributable sdist and wheel.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.14.1
LIGHTLY_VERSION ?= 1.6.0

DEPS_STAMP := $(VENV)/.deps-stamp
INSTALL_STAMP := $(VENV)/.install-stamp
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: install spill-check codegen test mutants wheel bench demo bench-regress checkstyle clean

$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==$(TORCH_VERSION) -r requirements-dev.txt
	# lightly's MACLLoss is a baseline; --no-deps keeps torchvision and friends out.
	$(PIP) install --quiet --no-deps lightly==$(LIGHTLY_VERSION)
	touch $@

# The extension (setup.py, which documents the knobs): the C++ CPU ops, and the CUDA
# kernels, forced in (MACL_KERNELS_CUDA=1) so that they are compiled and linked (not
# run) on a machine without a GPU too; MACL_KERNELS_DEBUG=1 makes a debug build. The
# compiler output, ptxas's resource report included, goes to $(BUILD_LOG); the objects
# stay in build/objects, where later builds (make wheel too) reuse what did not change.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
MACL_KERNELS_CUDA ?= 1
export CUDA_HOME MACL_KERNELS_CUDA
BUILD_LOG := build/build.log
# The knobs' values, rewritten only when they change: changing one rebuilds, as editing a source does.
KNOBS := build/knobs
KNOB_VALUES := CUDA_HOME=$(CUDA_HOME) MACL_KERNELS_CUDA=$(MACL_KERNELS_CUDA) \
	MACL_KERNELS_DEBUG=$(MACL_KERNELS_DEBUG) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST)
$(shell mkdir -p build && { echo '$(KNOB_VALUES)' | cmp -s - $(KNOBS) || echo '$(KNOB_VALUES)' > $(KNOBS); })

$(INSTALL_STAMP): $(DEPS_STAMP) $(SOURCES) $(KNOBS)
	mkdir -p build
	$(PIP) install -v --no-build-isolation --no-deps -e . > $(BUILD_LOG) 2>&1 || { tail -n 60 $(BUILD_LOG); exit 1; }
	touch $@

install: $(INSTALL_STAMP)

# Every CUDA kernel on sm_90 must show 0 bytes of register spills (tools/check_spills.py).
spill-check: install
	$(PY) tools/check_spills.py --arch 90 --log build/ptxas-sm_90.log

# The Triton kernels (and the extension's) compiled for sm_90 without a GPU: a fast subset of
# benchmarks/codegen.py must show no spills and shared memory within the block limit.
# Compiled kernels are cached in build/codegen-cache.
codegen: install
	$(PY) -m benchmarks.codegen --arch 90 --subset check --check --out build/codegen

test: install spill-check codegen wheel
	$(PY) -m pytest

# Deliberate bugs the tests must catch (tools/mutant_catalog.py, docs/MUTANTS.md), each applied to a
# scratch copy of the tree and checked by its focused test selection; fails if one survives or is
# stale. Not part of `make test`. The result table goes to build/mutants.md.
mutants: install
	$(PY) tools/mutants.py --markdown build/mutants.md

# The sdist and the binary wheel for this venv's torch (C++ CPU ops and CUDA kernels for
# sm_80 and sm_90), versioned like 0.1.0+torch2.14.1.cu130, in dist/, built from the
# objects of `make install`; then twine's check and tools/check_wheel.py: the wheel
# installed into a fresh venv that has only torch, with no compiler on PATH, computes
# the loss with backend="cpp". build/lib* goes first, so that no file deleted from the
# tree can linger in the wheel. Rebuilt when the package, csrc/ or the metadata change.
DIST := dist
WHEEL_LOG := build/wheel.log
WHEEL_STAMP := $(DIST)/.checked
WHEEL_INPUTS := $(SOURCES) README.md LICENSE MANIFEST.in $(shell find macl_kernels -name '*.py' 2>/dev/null)

$(WHEEL_STAMP): $(INSTALL_STAMP) $(WHEEL_INPUTS)
	rm -rf $(DIST) build/lib.* build/bdist.*
	{ $(PY) -m build --no-isolation --sdist --outdir $(DIST) . && \
	  MACL_KERNELS_LOCAL_VERSION=1 $(PY) -m build --no-isolation --wheel --outdir $(DIST) . ; } \
		> $(WHEEL_LOG) 2>&1 || { tail -n 60 $(WHEEL_LOG); exit 1; }
	$(PY) -m twine check --strict $(DIST)/*
	$(PY) tools/check_wheel.py $(DIST)/*.whl
	touch $@

wheel: $(WHEEL_STAMP)

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
	rm -rf build $(DIST) *.egg-info macl_kernels/*.so $(INSTALL_STAMP)
