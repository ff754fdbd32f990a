# Everything a fresh machine needs, in two targets: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned and installed before the package: an unpinned torch makes pip pull the CUDA build (several GB).
TORCH_VERSION := 2.13.0

.PHONY: setup test lint demo clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/ruff check ldm train tests examples benchmarks
	$(BIN)/python -m pytest -q tests
