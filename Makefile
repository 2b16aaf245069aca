# One-command set-up: `make test` and `make demo` create .venv, install the CPU torch
# wheel first (so no CUDA build is pulled), then mm-lens with its dev extra, every dependency at the
# committed, CI-tested version of requirements/lock.txt (refreshed by scripts/refresh_lock.sh), so the
# two commands install the same set on any day, whatever has been released since.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt

.PHONY: install lint test wheel-check try-newest lock demo bench clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

# `make test` = lint, then the test suite.
test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# The wheel from a clean checkout of HEAD in a fresh venv: pip check, then `mm-lens demo` outside the repository
# (WHEEL_CHECK_ARGS=--floors also installs every dependency at its floor).
wheel-check:
	bash scripts/check_wheel.sh $(WHEEL_CHECK_ARGS)

# The newest releases beyond pyproject.toml's ceilings, in a fresh venv: the core tests and a short demo
# (the first step of raising a ceiling; see the README's "Dependency versions").
try-newest:
	bash scripts/try_newest.sh

# Rewrite requirements/lock.txt from a fresh venv at the newest releases inside the declared ranges.
lock:
	bash scripts/refresh_lock.sh

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/mm-lens demo --out results/demo

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) results
