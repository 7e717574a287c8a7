# The README's commands. Everything installs into .venv from the package registries only.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo data test test-fast clean-outputs

install: $(STAMP)

# torch/torchvision first and pinned: an unpinned resolver may pick a multi-GB CUDA build. The ray extra
# is installed too, so the tests run the sweep on a real local Ray cluster (sweep.executor: ray).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $@

# The embedded default data: a deterministic chest-CT phantom in the Kaggle layout. Its hash is
# pinned by data.dvc, so regenerating it is the same data DVC versions.
data/raw: | $(STAMP)
	$(BIN)/ctsynth phantom --out data/raw --seed 0

data: data/raw

demo: install data
	$(BIN)/dvc repro
	$(BIN)/ctsynth summary

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

# The champion classifier over HTTP (serving/service.py): POST /predict with an `image` file field.
# `make serve HOST=0.0.0.0 PORT=8080` to listen elsewhere (HOST only from the command line: zsh
# exports HOST as the machine name); CTSYNTH_ONNX_MODEL=file.onnx serves a file, not the registry.
SERVE_HOST := $(if $(filter command line,$(origin HOST)),$(HOST),127.0.0.1)
PORT ?= 3000
.PHONY: serve
serve: | $(STAMP)
	$(BIN)/bentoml serve serving.service:CTSynthClassifier --host $(SERVE_HOST) --port $(PORT)

# MLflow UI on the local SQLite store (the one every stage writes when MLFLOW_TRACKING_URI is unset).
# First marks the study's experiments as model-training ones (stores made before that rule). MLflow
# 3.17's UI still opens on its GenAI pages unless the URL says workflowType=machine_learning (or the
# sidebar's "Model training" switch is clicked): the URL printed below. docs/operations.md: columns.
MLFLOW_PORT ?= 5000
.PHONY: ui mlflow-server
ui: | $(STAMP)
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlflow.db $(BIN)/python -c \
		'from ctsynth import tracking; [tracking.ensure_experiment(name) for name in tracking.EXPERIMENTS]'
	@echo "Open http://127.0.0.1:$(MLFLOW_PORT)/#/experiments?workflowType=machine_learning (the runs tables; MLflow 3.17 opens on its GenAI pages otherwise)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --default-artifact-root $(CURDIR)/mlartifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT)

# One tracking server for several writers (`dvc queue start -j 2`, several sweep workers): SQLite takes
# one writer at a time, so every process talks HTTP to this server and only it touches the database.
# Use it with: export MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT)
mlflow-server: | $(STAMP)
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--artifacts-destination $(CURDIR)/mlartifacts --serve-artifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1
