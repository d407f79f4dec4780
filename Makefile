# The two commands the README gives: `make train` and `make test`.
# Everything else here is plumbing that keeps them working on a fresh machine with only Python + pip.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Which torch to install, in one overridable place. Without an NVIDIA GPU we pin the CPU build
# (on this project's machines torch==2.13.0 is a local CPU wheel); with one, any torch >= 2.4.
# Override: `make train TORCH_SPEC='torch==2.11.0' TORCH_INDEX='--index-url <your index>'`.
TORCH_SPEC  ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
TORCH_INDEX ?=
CONFIG ?= configs/tiny.yaml
ARGS   ?=

.PHONY: train test lint format clean wheel-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

# DeepSpeed (tests of the client-optimizer path) must build against the installed torch, so it is
# installed without build isolation, before the dev extras.
$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q setuptools wheel packaging numpy
	$(PY) -m pip install -q --no-build-isolation "deepspeed>=0.14"
	$(PY) -m pip install -q -e ".[dev]"
	# The peer optimizers the tests reproduce (fira, apollo-torch) and the benchmarks run: test and
	# benchmark installs only, never leanlm dependencies (apollo-torch is CC-BY-NC). --no-deps: their
	# metadata asks for tensorly and more that their optimizers never import.
	$(PY) -m pip install -q --no-deps fira==1.0.2 apollo-torch==1.0.3 galore-torch==1.0 bitsandbytes==0.50.2
	touch $@ $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/leanlm train $(CONFIG) $(ARGS)

# The pytest entry point, not `python -m pytest`: the latter puts the checkout on sys.path, where
# its engine/, optim/ and kernels/ folders would shadow installed packages of those names.
test: $(VENV)/.installed-dev
	$(VENV)/bin/pytest -q $(ARGS)

# The wheel a user would pip install: built, installed in a fresh venv, `leanlm train tiny` run from it.
wheel-check: $(VENV)/.installed-dev
	scripts/check_wheel.sh $(PY) "$(TORCH_SPEC)"

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	scripts/typecheck.sh $(PY)
	$(PY) scripts/code_health.py

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
