# avex developer tasks.  `make test` is what CI runs (.ci/run): lint, types, the docs site, then the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.avex-installed
ARGS   ?=

.PHONY: setup benchmark lint docs test clean

# Idempotent: venv if missing, install if pyproject/constraints changed, data.
setup: $(STAMP)
	$(BIN)/avex data fashion-mnist

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Exact pins keep pip on the CPU torch wheel (no CUDA packages).  Top-level
# __init__.py files are prerequisites because the editable install maps only
# the packages that existed when it ran.
$(STAMP): pyproject.toml constraints.txt $(wildcard avex/__init__.py envs/__init__.py agents/__init__.py) | $(BIN)/python
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $@

benchmark: setup
	$(BIN)/avex benchmark $(ARGS)

# ruff (lint and format) and mypy, configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The documentation site (avex docs): pages generated from the code into build/docs, then
# `mkdocs build --strict` into build/site, so a broken reference or link fails.
docs: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/avex docs

test: setup lint docs
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
