# Hearth: two commands matter.
#   make demo   set up and run a working fleet on the embedded default (SQLite + supervised Mosquitto)
#   make test   set up and run every check and test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hearth-installed
PYTEST_ARGS ?=

.PHONY: demo test setup system-deps lint typecheck secrets pytest clean

system-deps:
	@HEARTH_NEED_BROWSER=$(NEED_BROWSER) scripts/ensure-system-deps.sh

$(STAMP): pyproject.toml
	@echo "==> Creating the virtual environment $(VENV) and installing Hearth with its dependencies"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)
	@echo "==> Installed into $(VENV)"

setup: system-deps $(STAMP)
	@$(BIN)/python -m hearth.service.broker_plugin

demo: setup
	@echo "==> Running the demo: hearth demo (starts broker, service and 6 units; about a minute)"
	@$(BIN)/hearth demo

lint: setup
	@echo "==> ruff (lint)"
	@$(BIN)/ruff check src tests bench

typecheck: setup
	@echo "==> mypy --strict (src/hearth)"
	@$(BIN)/mypy

secrets: setup
	@echo "==> detect-secrets: no secret may be committed"
	@$(BIN)/python scripts/check_secrets.py
	@echo "==> the built wheel carries no key or secret"
	@$(BIN)/python scripts/check_wheel.py

pytest: setup
	@echo "==> pytest (real Mosquitto, real TLS, SQLite$${HEARTH_TEST_DATABASE_URL:+ and PostgreSQL})"
	@$(BIN)/pytest $(PYTEST_ARGS)

test: NEED_BROWSER := 1
test: setup lint typecheck secrets pytest
	@echo "==> All checks passed"

clean:
	rm -rf $(VENV) hearth-data .pytest_cache .mypy_cache .ruff_cache
