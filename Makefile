# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each install step leaves a stamp in .venv, so a second run skips it.
PY_BOOT ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMPS  := $(VENV)/.stamps

.PHONY: demo test lint install bench clean

demo: install
	$(VENV)/bin/relief fit --config recipes/quickstart.yaml

test: install lint
	$(PY) -m pytest -q -n 2 --durations=15

# the device-dependent tests on the CPU and on every GPU present (a missing CUDA shows as a skip with its reason)
.PHONY: test-gpu
test-gpu: install
	$(PY) -m pytest -q -ra tests/test_devices.py --device all

# ruff (lint and format) and mypy as configured in pyproject.toml
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy lightning_relief

install: $(STAMPS)/analog

$(STAMPS)/venv:
	$(PY_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" wheel setuptools
	mkdir -p $(STAMPS) && touch $@

# torch first, alone: the CUDA 2.14.1 wheel lies on local disk and every other
# package (aihwkit's build in particular) must see this one.
$(STAMPS)/torch: $(STAMPS)/venv
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	touch $@

$(STAMPS)/package: $(STAMPS)/torch pyproject.toml
	$(PIP) install -q -e ".[dev]"
	touch $@

# aihwkit ships as source only: it needs OpenBLAS headers and its build tools,
# and must compile against the torch installed above (no build isolation); its
# build calls mypy's stubgen, so the venv's bin must be on PATH.
$(STAMPS)/analog: $(STAMPS)/package
	@dpkg -s libopenblas-dev >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev)
	$(PIP) install -q scikit-build cmake pybind11 ninja mypy
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PIP) install -q --no-build-isolation "aihwkit>=0.9"
	touch $@

bench: install
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) lightning_logs .relief_cache
