# ssl_lightning: every command bootstraps the environment (uv + the locked dependencies) on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.synced
DEMO := fixmatch_digits_40
EXP ?= $(DEMO)
ARGS ?=
PYTEST_ARGS ?=
# One pytest worker per core (pytest-xdist); each worker trains with one thread (tests/conftest.py).
TEST_WORKERS ?= auto
export UV_PYTHON_DOWNLOADS := never

.PHONY: help env train test bench lint experiments

help:
	@echo "make train [EXP=<experiment>] [ARGS=\"--trainer.max_steps=100 ...\"]  train (default: the offline digits demo)"
	@echo "make test                                                       run the test suite"
	@echo "make bench                                                      run the benchmarks"
	@echo "make lint                                                       ruff"
	@echo "make experiments                                                list the experiments"

# uv is the environment manager; install it for this user if the machine does not have it yet.
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)

$(UV):
	python3 -m pip install --user --quiet uv

# Bytecode is compiled once here: with PYTHONDONTWRITEBYTECODE set (as on our CI machines) every new
# process would otherwise recompile ~6,500 modules, 14 s of CPU per interpreter (DDP ranks, `make train`).
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode --python python3
	@touch $@

env: $(STAMP)

experiments:
	@ls experiments/*.yaml | xargs -n1 basename | sed 's/\.yaml$$//'

train: $(STAMP)
	@if [ ! -f experiments/$(EXP).yaml ]; then \
		echo "Unknown experiment '$(EXP)'. Available experiments:"; \
		ls experiments/*.yaml | xargs -n1 basename | sed 's/\.yaml$$//' | sed 's/^/  /'; \
		exit 2; \
	fi
	$(PY) -m ssl_lightning fit --config experiments/$(EXP).yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist load --maxschedchunk=2 --durations=25 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m ssl_lightning.bench

lint: $(STAMP)
	$(VENV)/bin/ruff check ssl_lightning tests
