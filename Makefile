# The two commands: `make repro` runs the pipeline, `make test` runs the test suite.
# Both set up whatever is missing first (venv, pinned install, data package).
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup repro test test-fast eval-standard bench
setup:
	@scripts/setup.sh

repro: setup
	dvc repro

test: setup
	python -m pytest -q $(PYTEST_ARGS)

test-fast: setup   # the inner loop: everything but the end-to-end runs (a few minutes)
	python -m pytest -q -m 'not slow' $(PYTEST_ARGS)

# Both families' champions at the standard protocol (10k samples vs the 10k test split, fp32 Inception),
# with its floor; writes metrics/eval/standard/<family>.json. About 1.5 h on 2 CPU cores (RESULTS.md).
eval-standard: setup
	python -m pipelines.ref_stats --set evaluate.protocol=standard
	python -m pipelines.evaluate --family gan --model models:/genforge-gan@champion --set evaluate.protocol=standard
	python -m pipelines.evaluate --family ldm --model models:/genforge-ldm@champion --set evaluate.protocol=standard

bench: setup
	python benchmarks/gan_throughput.py
