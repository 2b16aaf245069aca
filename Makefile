# One-command set-up: `make test` and `make demo` create .venv, install the CPU torch
# wheel first (so no CUDA build is pulled), then mm-lens with its dev extra.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint test wheel-check demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
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

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/mm-lens demo --out results/demo

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) results
