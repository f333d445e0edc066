# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    := runs
# Tested versions; pip takes them from the local wheel cache here, from PyPI elsewhere.
TORCH  := torch==2.14.1 torchvision==0.29.1

# Telemetry off and the other client defaults: `agegender` and the tests set them in Python
# (deployments/services.py); a target that runs mlflow or prefect itself goes through
# `python -m deployments.services`.

.PHONY: venv lint format test test-fast demo serve bench stack stack-down stack-status clean

venv: $(STAMP)

# uv installs (several times faster than pip for torch's CUDA wheels) with pip's configuration
# (indexes, find-links, constraints: tools/uv_install.py); pip does it where uv is not to be had.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv || echo "uv not installable: pip installs instead (slower)"
	$(BIN)/python tools/uv_install.py -q $(TORCH)
	$(BIN)/python tools/uv_install.py -q -e '.[dev]'
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

# The main job at demo size: a synthetic Adience download (816 px JPEGs, 5 folds) and a synthetic
# CelebA download (official layout, 178 x 218 px), then the whole suite (4 variants x 5 folds,
# Prefect + MLflow, two folds at a time sharing the cores: suite.slots=2) on 72 px
# images with 64 px crops, with the `modern` preset for speed (the
# suite's default is `paper`; the tables say which). The suite pretrains on CelebA beside the from-scratch folds (once:
# a rerun reuses the run), registers the backbone and starts multitask_pretrained from it. Each
# variant's best fold (by validation) is registered as agegender-<variant>@champion; the demo
# ends by running that model on synthetic users' photos (faces found, one row per face). The data
# are synthetic, so the summary is titled so and tests nothing against published numbers.
DEMO := $(RUN)/demo
DEMO_CFG := data.crop=64 train.epochs=10 suite.slots=2
demo: venv
	$(BIN)/agegender synth --out $(DEMO)/adience --per-fold 200 --size 816
	$(BIN)/agegender data stats --metadata $(DEMO)/adience
	$(BIN)/agegender synth --format celeba --out $(DEMO)/celeba --count 4000
	$(BIN)/agegender suite --data-root $(DEMO)/adience --run-root $(DEMO)/suite --preset modern \
	    suite.image_size=72 suite.pretrain.root=$(DEMO)/celeba $(DEMO_CFG)
	$(BIN)/agegender synth --format photos --out $(DEMO)/photos --count 12
	$(BIN)/agegender predict $(DEMO)/photos --model models:/agegender-multitask@champion \
	    --run-root $(DEMO)/suite --out $(DEMO)/predictions.jsonl
	@echo "one row per face: $(DEMO)/predictions.jsonl (where the faces were drawn: $(DEMO)/photos/faces.csv)"

# A registered model as a REST service (default: the demo's champion in the demo's MLflow store;
# with MLFLOW_TRACKING_URI set, that server's): `agegender serve`, MLflow's scoring protocol on
# http://127.0.0.1:5001 (/invocations, /ping, /model, /metrics). SERVE_ARGS: settings, e.g.
# "max_photos=16 float_range=0..1" (README: Serving).
SERVE_MODEL ?= models:/agegender-multitask@champion
SERVE_PORT ?= 5001
SERVE_ARGS ?=
# OMP_WAIT_POLICY=PASSIVE: torch's idle OpenMP threads sleep instead of spinning, leaving the
# cores to the decode threads (benchmarks/serve.py, 4 and 16 clients: 0.66-0.87 -> 0.80-0.91 x the CLI).
serve: venv
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/agegender serve --model $(SERVE_MODEL) --run-root $(DEMO)/suite --port $(SERVE_PORT) \
	    $(SERVE_ARGS)

# The local service stack (S3, MLflow, Prefect server + worker) on 127.0.0.1; S3 credentials from
# the environment or .env (see .env.example). PIDs and logs under runs/stack.
stack: venv
	$(BIN)/agegender stack up

stack-down:
	$(BIN)/agegender stack down

stack-status: venv
	$(BIN)/agegender stack status

bench: venv
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/predict.py

clean:
	rm -rf $(RUN) .pytest_cache .mypy_cache .ruff_cache
