# The two commands: `make repro` runs the pipeline, `make test` runs the test suite.
# Both set up whatever is missing first (venv, pinned install, data package).
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup repro repro-conditional test test-fast eval-standard eval-standard-conditional bench demo
setup:
	@scripts/setup.sh

repro: setup
	dvc repro

# The conditional families (Pix2Pix, text-to-image): their own pipeline, beside the default one (README, "Conditional families")
repro-conditional: setup
	dvc repro conditional/dvc.yaml

# Tests run in TEST_WORKERS processes (pytest-xdist): most of a Ray or pipeline test is process start-up that leaves
# a core idle part of the time; three at a time keep two cores busier than two do (README, "Tests"). A module whose
# tests share an expensive set-up (the e2e `dvc repro`, the 2-node cluster) is one xdist group and stays in one
# process. TEST_WORKERS=0: one process, in order.
TEST_WORKERS ?= 3
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadgroup)

test: setup
	python -m pytest -q $(XDIST) $(PYTEST_ARGS)

# The registry's champions in a browser: http://127.0.0.1:7860 (params.yaml serving.demo_host/demo_port)
demo: setup
	python -m pipelines.demo

test-fast: setup   # the inner loop: everything but the end-to-end runs (a few minutes)
	python -m pytest -q $(XDIST) -m 'not slow' $(PYTEST_ARGS)

# Both families' models from the last `make repro` (models/gan, models/ldm) at the standard protocol (10k samples
# vs the whole 10k test split, fp32 Inception), with its floor: metrics/eval/standard/<family>.json. A registered
# version instead: python -m pipelines.evaluate --family gan --model models:/genforge-gan@champion --set evaluate.protocol=standard
# Hours on 2 CPU cores (20k Inception images for the floor, 10k per family; RESULTS.md).
eval-standard: setup
	python -m pipelines.ref_stats --set evaluate.protocol=standard
	python -m pipelines.evaluate --family gan --set evaluate.protocol=standard
	python -m pipelines.evaluate --family ldm --set evaluate.protocol=standard

# The conditional families' models from the last `make repro-conditional` at the standard protocol (every test-split image
# translated / generated from its caption: 10k each; RESULTS.md "Pix2Pix", "Text-to-image"). Needs the standard ref_stats.
eval-standard-conditional: setup
	python -m pipelines.ref_stats --set evaluate.protocol=standard
	python -m pipelines.evaluate --family pix2pix --set evaluate.protocol=standard
	python -m pipelines.evaluate --family t2i --set evaluate.protocol=standard

bench: setup
	python benchmarks/gan_throughput.py
