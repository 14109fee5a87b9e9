# Developer entry points. `make test` is the README's test command; `.ci/run` is what CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
COMPILED := $(VENV)/.compiled
PG_PACKAGES := postgresql-15 postgresql-15-wal2json

.PHONY: venv build pg test demo check bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "cdcsync needs Python 3.11 or newer; '$(PYTHON)' is $$($(PYTHON) --version 2>&1)."; \
	  echo "Install python3.11 (or newer) and run: make PYTHON=python3.11 venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	@# Compiling waits for `make build`, which redoes it whenever a compiled module changes.
	CDCSYNC_PURE_PYTHON=1 $(VENV)/bin/pip install --quiet -e '.[dev]'
	@# pip byte-compiles what it installs, but not an editable project: without this, where
	@# PYTHONDONTWRITEBYTECODE is set every start of cdcsync compiles it anew (about 0.25 s).
	$(VENV)/bin/python -m compileall -q cdcsync
	@touch $(STAMP)

# The modules setup.py compiles with mypyc, built in place; an extension module shadows its .py,
# so a stale one would run old code: any change under cdcsync/source/ builds them again.
build: $(COMPILED)

$(COMPILED): $(STAMP) setup.py $(wildcard cdcsync/source/*.py cdcsync/source/*.c)
	@if ! $(VENV)/bin/python -c 'import pathlib, shutil, sys, sysconfig; sys.exit(not (shutil.which("gcc") and pathlib.Path(sysconfig.get_paths()["include"], "Python.h").exists()))'; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing gcc and python3-dev to compile the hot modules (best effort)"; \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y gcc python3-dev \
	      || echo "warning: not installed; cdcsync runs as plain Python, about half as fast"; \
	  else \
	    echo "note: no gcc or Python headers; cdcsync runs as plain Python, about half as fast."; \
	    echo "  To compile its hot modules: sudo apt-get install -y gcc python3-dev && make build"; \
	  fi; \
	fi
	find cdcsync -name '*.so' -delete
	$(VENV)/bin/pip install --quiet --no-build-isolation --no-deps -e .
	@touch $@

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
	@# The tests of a target behind a connection pooler run a real PgBouncer; they skip without it.
	@if [ "$$(id -u)" = 0 ] && ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then \
	  echo "Installing pgbouncer (best effort)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer \
	    || echo "warning: could not install pgbouncer; the pooler tests will skip"; \
	fi

test: build pg
	$(VENV)/bin/pytest -q tests

demo: build pg
	$(VENV)/bin/cdcsync demo

check: venv
	$(VENV)/bin/ruff check cdcsync tests bench setup.py
	$(VENV)/bin/mypy cdcsync bench tests
	$(VENV)/bin/hadolint Dockerfile

bench: build pg
	$(VENV)/bin/python -m bench.throughput --scenario all

clean:
	find cdcsync -name '*.so' -delete
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
