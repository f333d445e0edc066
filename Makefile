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

# For now: a synthetic Adience download, its cache, what the data layer sees in it, and one fold
# trained at demo size (the suite issue turns this into the full 4 x 5-fold suite).
DEMO := $(RUN)/demo
demo: venv
	$(BIN)/agegender synth --out $(DEMO)/adience --per-fold 200 --size 816
	$(BIN)/agegender prepare --data-root $(DEMO)/adience --cache $(DEMO)/cache --image-size 256
	$(BIN)/agegender data stats --cache $(DEMO)/cache
	$(BIN)/agegender data split --cache $(DEMO)/cache --fold 0
	$(BIN)/agegender prepare --data-root $(DEMO)/adience --cache $(DEMO)/cache-72 --image-size 72
	$(BIN)/agegender train-fold --cache $(DEMO)/cache-72 --fold 0 --out $(DEMO)/fold0 --resume \
	    data.crop=64 train.epochs=12 optim.name=adam optim.lr=0.0005 optim.weight_decay=0 \
	    optim.schedule=cosine model.norm=batchnorm

bench: venv
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(RUN) .pytest_cache .mypy_cache .ruff_cache
