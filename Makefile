# Two set-up commands on a fresh machine: `make demo` and `make test`.
# Both create or reuse .venv and install what they need. Torch is installed as torch==2.13.0
# when no torch is importable in the venv, so no resolver ever pulls a newer (CUDA) torch.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip install --quiet --disable-pip-version-check
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-fast bench lint venv install install-test clean gpu-wheels gpu-check

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(VENV)/bin/python
	@$(VPY) -c "import torch" 2>/dev/null || $(PIP) "torch==$(TORCH_VERSION)"
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PIP) -e ".[test]"
	@touch $@ $(VENV)/.installed

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-test
	$(PIP) -e ".[dev]"
	@touch $@

venv install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## demo: simulate a MOLLI series of a phantom with known T1, fit it, print truth vs estimate, write maps.
demo: $(VENV)/.installed
	$(VPY) -m qmrkit.demo --out demo-output

## test: the whole suite (slow tests included), as CI runs it. Whole files per worker, in the order
## tests/conftest.py puts them (files with slow tests first), so the two workers finish together.
test: $(VENV)/.installed-test
	$(VPY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

## test-fast: skip the tests marked slow (for development).
test-fast: $(VENV)/.installed-test
	$(VPY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

## bench: every benchmark script (NUFFT in its --quick form; the full run takes ~40 min on 2 cores:
## `.venv/bin/python benchmarks/nufft.py`); tables printed, numbers written to benchmarks/results/.
bench: $(VENV)/.installed-test
	@for b in fit_relaxometry mcmc mrf serve recon mel optim_ops; do \
		echo "== benchmarks/$$b.py"; $(VPY) benchmarks/$$b.py || exit 1; done
	$(VPY) benchmarks/nufft.py --quick

## gpu-wheels: download (here, with network) the wheels the lent GPU machine's python3 lacks into
## .gpu-wheels/ (git-ignored, carried to the run; measured and kept under 48 MiB). See docs/gpu.md.
gpu-wheels:
	$(PYTHON) benchmarks/gpu_wheels.py

## gpu-check: CUDA tests + a short GPU version of each benchmark in ≤ 8 min, results in
## benchmarks/results/gpu-check.json; on a machine without CUDA, CPU mode (GPU parts skipped with
## the reason). Uses GPU_PYTHON (default: the plain python3 that holds the CUDA torch), not .venv.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
