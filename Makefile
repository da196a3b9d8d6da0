# Animl classifier retraining pipeline. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CLI := $(BIN)/animl-retrain
STAMP := $(VENV)/.installed
export ANIML_STATE_DIR ?= $(CURDIR)/.state

.DEFAULT_GOAL := help
.PHONY: help venv run stop clean test test-fast test-images lint format compile lock images bench

# Container images (docker/): $(IMAGE_REGISTRY)/animl-retrain-{cpu,ml,mlflow,serving}:$(IMAGE_TAG). Export the same two
# variables when you run `animl-retrain submit/schedule`, so the pipeline names the images you pushed.
IMAGE_REGISTRY ?= ghcr.io/animl-retrain
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGES := cpu ml mlflow serving
DOCKER ?= docker
DOCKER_PLATFORM ?= linux/amd64
# The images' base (docker/*.Dockerfile ARG PYTHON_IMAGE): empty keeps python:3.11-slim-bookworm; a mirror's copy
# or a locally built image works the same (docs/kubeflow.md, "Images").
PYTHON_IMAGE ?=

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/constraints.txt requirements/no-deps.txt src/animl_retrain/vision/_jpegcrop.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[ml,local,test,dev,mlflow-server]'
	$(BIN)/pip install --quiet --no-deps -r requirements/no-deps.txt
	touch $@

venv: $(STAMP) ## create the project virtualenv (.venv) with the pinned packages

run: $(STAMP) ## start the embedded S3 + MLflow, seed the demo project, run the pipeline locally
	$(CLI) services start
	$(CLI) demo --embedded
	$(CLI) run --params examples/demo.yaml

stop: ## stop the embedded services (by their PIDs)
	@if [ -x $(CLI) ]; then $(CLI) services stop; fi

clean: stop ## stop the services and delete the local state (S3 data, MLflow database, run artifacts)
	rm -rf $(ANIML_STATE_DIR)

test: lint ## lint, then every test that needs no GPU and is not marked slow
	$(BIN)/pytest -m "not slow and not gpu"

test-images: $(STAMP) ## slow: build the CPU and ML images, run the demo pipeline in them (needs Docker with BuildKit)
	DOCKER=$(DOCKER) PYTHON_IMAGE=$(PYTHON_IMAGE) ANIML_TEST_IMAGES=1 $(BIN)/pytest -rP -m slow tests/test_container_images.py

test-fast: $(STAMP) ## unit tests only: no servers, no pipeline run
	$(BIN)/pytest -m "not server and not pipeline and not slow and not gpu"

lint: $(STAMP) ## ruff lint and format check, hadolint on every Dockerfile
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint docker/*.Dockerfile

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) ## speed of every stage against what a user would use instead (STAGE=crop: one; RESEARCH_DATA=dir)
	$(BIN)/python -m bench.run $(if $(STAGE),--stage $(STAGE)) $(if $(RESEARCH_DATA),--research-data $(RESEARCH_DATA))

compile: $(STAMP) ## compile the pipeline to pipelines/retrain.yaml
	$(CLI) compile

images: ## build and push the images: make images IMAGE_REGISTRY=registry.example/animl IMAGE_TAG=1.0
	@command -v $(DOCKER) >/dev/null || { echo "make images needs $(DOCKER) (with BuildKit)"; exit 1; }
	set -e; for name in $(IMAGES); do \
		DOCKER_BUILDKIT=1 $(DOCKER) build --platform $(DOCKER_PLATFORM) -f docker/$$name.Dockerfile \
			-t $(IMAGE_REGISTRY)/animl-retrain-$$name:$(IMAGE_TAG) $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) ). ; \
		$(DOCKER) push $(IMAGE_REGISTRY)/animl-retrain-$$name:$(IMAGE_TAG) ; \
	done

lock: $(STAMP) ## rewrite requirements/constraints.txt from the current virtualenv
	head -n 2 requirements/constraints.txt > requirements/constraints.txt.new
	$(BIN)/pip freeze --exclude-editable | grep -v -i -f <(sed -n 's/==.*//p' requirements/no-deps.txt) \
		>> requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt
