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

SWEEP ?=
NOTEBOOK_ARGS ?=
REPORT_ARGS ?=

.PHONY: help env train test bench lint experiments sweep agent notebooks report lab

help:
	@echo "make train [EXP=<experiment>] [ARGS=\"--trainer.max_steps=100 ...\"]  train (default: the offline digits demo)"
	@echo "make test                                                       run the test suite"
	@echo "make bench                                                      run the benchmarks"
	@echo "make lint                                                       ruff"
	@echo "make experiments                                                list the experiments"
	@echo "make sweep EXP=<sweep>                                          create a W&B sweep from experiments/sweeps/<sweep>.yaml"
	@echo "make agent SWEEP=<entity/project/id>                            run a W&B sweep agent"
	@echo "make notebooks [NOTEBOOK_ARGS=\"--tiny 01_quickstart\"]           execute the notebooks into runs/notebooks/"
	@echo "make report [REPORT_ARGS=\"--runs runs\"]                        results.json files -> runs/report/report.{md,csv,png}"
	@echo "make lab                                                        JupyterLab on notebooks/ (fetches jupyterlab on first use)"

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

# A sweep file is validated locally first, so a broken one never reaches the W&B server.
sweep: $(STAMP)
	@if [ ! -f experiments/sweeps/$(EXP).yaml ]; then \
		echo "Unknown sweep '$(EXP)'. Available sweeps:"; \
		ls experiments/sweeps/*.yaml | xargs -n1 basename | sed 's/\.yaml$$//' | sed 's/^/  /'; \
		exit 2; \
	fi
	$(PY) -m ssl_lightning.sweeps check $(EXP)
	$(VENV)/bin/wandb sweep experiments/sweeps/$(EXP).yaml

# The agent runs each sweep command (`${interpreter}` is `python`) with this environment's Python first on PATH.
agent: $(STAMP)
	@if [ -z "$(SWEEP)" ]; then echo "usage: make agent SWEEP=<entity/project/sweep_id> (printed by make sweep)"; exit 2; fi
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/wandb agent $(SWEEP)

notebooks: $(STAMP)
	$(PY) -m ssl_lightning.notebooks $(NOTEBOOK_ARGS)

report: $(STAMP)
	$(PY) -m ssl_lightning.report $(REPORT_ARGS)

lab: $(STAMP)
	$(UV) run --with jupyterlab jupyter lab notebooks/
