# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    := runs
# Tested versions; pip takes them from the local wheel cache here, from PyPI elsewhere.
TORCH  := torch==2.14.1 torchvision==0.29.1

export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: venv lint format test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest

test-fast: venv
	$(BIN)/pytest -m "not integration"

# For now: a small synthetic Adience download, its cache, and what the data layer sees in it.
DEMO := $(RUN)/demo
demo: venv
	$(BIN)/agegender synth --out $(DEMO)/adience --per-fold 100 --size 816
	$(BIN)/agegender prepare --data-root $(DEMO)/adience --cache $(DEMO)/cache --image-size 256
	$(BIN)/agegender data stats --cache $(DEMO)/cache
	$(BIN)/agegender data split --cache $(DEMO)/cache --fold 0

bench: venv
	$(BIN)/python benchmarks/prepare.py

clean:
	rm -rf $(RUN) .pytest_cache .mypy_cache .ruff_cache
