# Developer entry points. `make test` is the README's test command; `.ci/run` is what CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PG_PACKAGES := postgresql-15 postgresql-15-wal2json

.PHONY: venv pg test demo check bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "cdcsync needs Python 3.11 or newer; '$(PYTHON)' is $$($(PYTHON) --version 2>&1)."; \
	  echo "Install python3.11 (or newer) and run: make PYTHON=python3.11 venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	@# pip byte-compiles what it installs, but not an editable project: without this, where
	@# PYTHONDONTWRITEBYTECODE is set every start of cdcsync compiles it anew (about 0.25 s).
	$(VENV)/bin/python -m compileall -q cdcsync
	@touch $(STAMP)

# The server binaries are required; wal2json is only used by some tests and demos, so best effort.
pg:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "PostgreSQL server binaries not found. Install them with:"; \
	    echo "  sudo apt-get update && sudo apt-get install -y $(PG_PACKAGES)"; \
	    exit 1; \
	  fi; \
	  if grep -qs 'VERSION_CODENAME=bookworm' /etc/os-release; then pkgs="$(PG_PACKAGES)"; \
	  else pkgs="postgresql"; fi; \
	  echo "Installing PostgreSQL: apt-get install -y $$pkgs"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$pkgs; \
	elif [ "$$(id -u)" = 0 ] && ls -d /usr/lib/postgresql/15/bin >/dev/null 2>&1 \
	     && ! dpkg -s postgresql-15-wal2json >/dev/null 2>&1; then \
	  echo "Installing postgresql-15-wal2json (best effort)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql-15-wal2json \
	    || echo "warning: could not install postgresql-15-wal2json; wal2json tests will fail or skip"; \
	fi

test: venv pg
	$(VENV)/bin/pytest -q tests

demo: venv pg
	$(VENV)/bin/cdcsync demo

check: venv
	$(VENV)/bin/ruff check cdcsync tests bench
	$(VENV)/bin/mypy cdcsync
	$(VENV)/bin/hadolint Dockerfile

bench: venv pg
	$(VENV)/bin/python -m bench.throughput --scenario all

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
