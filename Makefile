# Two commands for a fresh clone: `make dev` (whole system on embedded servers) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Installs the versions in requirements.lock (what the suite passed with), not whatever is newest
# today; the progress bar stays on, since a cold install takes minutes on a slow network.
LOCK := requirements.lock
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	@echo "installing the locked dependencies into $(VENV) (a few minutes on a cold cache)..."
	$(PY) -m pip install --progress-bar on -c $(LOCK) -e '.[embedded,test,lint]'
	touch $@

.PHONY: install dev test lint bench chaos soak schemas lock
install: $(VENV)/.installed

# Re-resolves pyproject.toml's ranges in a throw-away venv and writes their exact versions to
# requirements.lock. Then run `make test` on it (the Makefile reinstalls) and commit both.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q -e '.[embedded,test,lint,rocksdb]'
	sed -n '/^#/p' $(LOCK) > $(LOCK).new
	$(LOCK_VENV)/bin/pip freeze --all --exclude-editable >> $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK); now run: make test"

dev: $(VENV)/.installed
	$(PY) -m app dev --demo

test: $(VENV)/.installed
	scripts/ensure-chromium
	$(PY) -m app schemas check
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 -n 3 --dist loadgroup

# ruff (pycodestyle, pyflakes, import order) and mypy, as configured in pyproject.toml.
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: $(VENV)/.installed
	$(PY) -m bench.run

# The fault-injection soak: every fault in turn under load, on servers of its own.
# Counts are settable, e.g. `make chaos CHAOS_ARGS="--rounds 5 --rate 300"` (see --help).
CHAOS_ARGS ?=
chaos: $(VENV)/.installed
	$(PY) -m chaos $(CHAOS_ARGS)

# The faults that once lost an event or stalled a worker (storm, worker takeover), 20 runs each,
# each on a fresh stack at the test suite's settings; over an hour, so not part of `make test`.
# Writes test-artifacts/soak-<date>.md, e.g. `make soak SOAK_ARGS="--runs 5 --burn"` (see --help).
SOAK_ARGS ?=
soak: $(VENV)/.installed
	$(PY) -m chaos.soak $(SOAK_ARGS)
