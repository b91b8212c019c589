# Two commands for a fresh clone: `make dev` (whole system on embedded servers) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[embedded,test]'
	touch $@

.PHONY: install dev test bench chaos schemas
install: $(VENV)/.installed

dev: $(VENV)/.installed
	$(PY) -m app dev --demo

test: $(VENV)/.installed
	scripts/ensure-chromium
	$(PY) -m app schemas check
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) -m bench.run

# The fault-injection soak: every fault in turn under load, on servers of its own.
# Counts are settable, e.g. `make chaos CHAOS_ARGS="--rounds 5 --rate 300"` (see --help).
CHAOS_ARGS ?=
chaos: $(VENV)/.installed
	$(PY) -m chaos $(CHAOS_ARGS)
