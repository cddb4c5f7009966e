# Makefile — developer and CI entry points of the disaster-recovery platform.
#
# `make help` lists the targets. The local stack (Kafka 3.9 in KRaft mode and a
# throwaway PostgreSQL, no Docker) is driven by deploy/local/stack.sh; its settings
# (DR_STATE_DIR, KAFKA_PORT, PG_PORT, PG_TLS, DATABASE_URL, ...) are read from the environment,
# e.g. `KAFKA_PORT=29092 PG_PORT=25432 make test`, `PG_TLS=require make up` (PostgreSQL only
# over TLS, verified against the stack's CA, and with a generated password).
#
# Prerequisites (Debian 12): `make prereqs` (deploy/local/prereqs.sh) checks the system
# packages (python3.11, java 17, maven, postgresql, nginx, kcat, rsync, prometheus) and, as
# root, installs what is missing with apt-get; otherwise it prints the one command to run.
# `make up`, `test`, `demo` and `run` run it first; so does `.ci/run`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.stamp
STACK    := deploy/local/stack.sh

# Source folders that exist right now (some are added later by other work).
LINT_DIRS := $(wildcard services shared kit tests bench scripts)
TYPE_DIRS := $(wildcard services shared kit)

# Interpreter for the venv: python3.11, else python3 when that is 3.11.
PYTHON311 := $(shell command -v python3.11 2>/dev/null || \
               { python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null && command -v python3; })

# Component for `make logs` (kafka, postgres or nginx; empty = all).
C ?=

.PHONY: help prereqs venv up down status logs check test demo bench run stop ps clean

help: ## List the targets
	@echo "Targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "} {printf "  %-8s %s\n", $$1, $$2}'
	@echo
	@echo "Stack settings come from the environment, see the header of $(STACK)."

# ---------------------------------------------------------------- Python environment

prereqs: ## Install missing Debian packages (as root; otherwise print the apt-get command)
	deploy/local/prereqs.sh

venv: $(STAMP) ## Create .venv (Python 3.11) and pip install -e '.[dev]' when pyproject.toml changed

# The stamp is older than pyproject.toml after an edit: reinstall then, and only then.
$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON311)" ]; then \
	  echo "ERROR: Python 3.11 not found (no python3.11, and python3 is not 3.11)."; \
	  echo "       Debian: apt-get install -y python3.11 python3.11-venv"; \
	  exit 2; \
	fi
	@if [ ! -x $(PY) ]; then \
	  echo "creating $(VENV) with $(PYTHON311)"; \
	  $(PYTHON311) -m venv $(VENV); \
	fi
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

# ---------------------------------------------------------------- local stack

up: prereqs ## Start Kafka + PostgreSQL + the nginx gateway (idempotent) and print stack.env
	$(STACK) up

down: ## Stop the gateway, Kafka and PostgreSQL (data kept)
	$(STACK) down

status: ## One line per component; fails if one is down
	$(STACK) status

logs: ## Show the stack logs (C=kafka, C=postgres or C=nginx for one)
	$(STACK) logs $(C)

# ---------------------------------------------------------------- quality gates

check: venv ## Lint (ruff check + ruff format --check) and type-check (mypy)
	@if [ -z "$(LINT_DIRS)" ]; then echo "nothing to lint"; exit 0; fi
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	@if [ -n "$(TYPE_DIRS)" ]; then \
	  echo "$(VENV)/bin/mypy $(TYPE_DIRS)"; $(VENV)/bin/mypy $(TYPE_DIRS); \
	fi

test: prereqs venv ## Run pytest against the stack (started and stopped if it was down); PYTEST_ARGS=...
	deploy/local/run-tests.sh

# ---------------------------------------------------------------- demo and benchmark

demo: prereqs venv up ## Run the end-to-end demo (python -m scripts.demo) on the stack
	$(STACK) exec $(PY) -m scripts.demo

bench: venv up ## Run the benchmarks (python -m bench) on the stack
	$(STACK) exec $(PY) -m bench

# ---------------------------------------------------------------- the platform for an operator

run: prereqs venv up ## The whole platform in the background under supervisord (services, sites)
	$(STACK) exec $(PY) -m scripts.run start

ps: ## The platform's processes (supervisord) and the stack
	-$(PY) -m scripts.run status
	$(STACK) status

stop: ## Stop the platform's processes and the stack (data kept; `make run` resumes)
	$(PY) -m scripts.run stop
	$(STACK) down

# ---------------------------------------------------------------- housekeeping

clean: ## Stop the platform and the stack and delete .state (the .cache download cache is kept)
	-[ ! -x $(PY) ] || $(PY) -m scripts.run stop
	$(STACK) purge
