# The two commands: `make repro` runs the pipeline, `make test` runs the test suite.
# Both set up whatever is missing first (venv, pinned install, data package).
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup repro test bench
setup:
	@scripts/setup.sh

repro: setup
	dvc repro

test: setup
	python -m pytest -q $(PYTEST_ARGS)

bench: setup
	python benchmarks/gan_throughput.py
