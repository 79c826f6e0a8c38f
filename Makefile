# editinfinity: one entry point for people and CI.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned on this install path: an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH ?= torch==$(TORCH_VERSION)
export EDITINFINITY_PARITY_DIR ?= $(abspath ../shared/parity)
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install install-base test test-gpu mutation lint demo compile images images-cpu images-cuda print-image-cuda print-image-cpu print-base-image base-image image-test bench clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -q -e ".[test]"
	touch $@

install-base: $(VENV)/.base
install: $(VENV)/.test

test: install
	$(PY) -m pytest -q

# The CUDA-marked tests (the edit under bf16 autocast, bf16 vs float32 agreement, ...) on a CUDA machine, with the
# python that has torch there (no venv: a GPU machine brings its own CUDA torch; it needs the project's other
# dependencies, e.g. `pip install --no-deps diffusers`); the output is kept in GPU_OUT (bench/results/test_gpu_h200.txt:
# `make test-gpu GPU_OUT=bench/results/test_gpu_h200.txt` on one H200, torch 2.11).
GPU_PYTHON ?= python3
GPU_OUT ?= bench/results/test_gpu.txt
test-gpu:
	@$(GPU_PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'make test-gpu needs a CUDA machine (torch.cuda.is_available() is False)')"
	@mkdir -p $(dir $(GPU_OUT))
	@{ $(GPU_PYTHON) -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; \
	  PYTHONPATH=core:. $(GPU_PYTHON) -m pytest -m gpu -v -rs -p no:cacheprovider tests/test_gpu.py tests/test_infinity.py; \
	} > $(GPU_OUT).tmp 2>&1; rc=$$?; mv $(GPU_OUT).tmp $(GPU_OUT); cat $(GPU_OUT); \
	if grep -q " SKIPPED" $(GPU_OUT); then echo "make test-gpu: a CUDA test was skipped"; exit 1; fi; exit $$rc

# Plant known training and blending bugs one at a time in a temp copy and report which the tests catch (minutes).
mutation: install
	$(PY) tests/mutation.py

lint: install
	$(VENV)/bin/ruff check core tests bench components pipelines

demo: install-base
	$(VENV)/bin/editinfinity demo --out demo_output --overwrite

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REPO ?= ghcr.io/editinfinity/editinfinity

compile: install
	$(PY) -m pipelines.compile --all --out build/pipelines

# ---- Images (docs/kubeflow.md "Images"): docker or podman ----------------------------------------------------
# DOCKER: a docker whose engine answers, else podman (evaluated once, only when an image target runs).
DOCKER ?= $(eval DOCKER := $(shell (docker info >/dev/null 2>&1 && echo docker) || \
	(command -v podman >/dev/null 2>&1 && echo podman) || echo docker))$(DOCKER)
# BASE=registry: the Dockerfiles' python:3.11-slim-bookworm; BASE=local: the Debian-made base of images/base/
# (built once, tagged by a hash of its recipe), for machines without access to Docker Hub.
BASE ?= registry
BASE_IMAGE ?= localhost/editinfinity-base:py3.11-bookworm-$(shell cat images/base/build.sh images/base/Containerfile | sha256sum | cut -c1-12)
# torch of the CPU image: TORCH_INDEX_URL (default: the Dockerfile's, download.pytorch.org/whl/cpu) or TORCH_WHEELS,
# a folder holding torch-$(TORCH_VERSION)+cpu*.whl (copied into images/wheels/). The CUDA image takes the pinned
# PyPI build; change it with CUDA_BUILD_ARGS="--build-arg TORCH_INDEX_URL=...".
TORCH_INDEX_URL ?=
TORCH_WHEELS ?=
# Extra flags for every build (e.g. --runtime runc --network host), and for one image only.
BUILD_ARGS ?=
CPU_BUILD_ARGS ?=
CUDA_BUILD_ARGS ?=
GIT_REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)$(shell git diff --quiet HEAD -- 2>/dev/null || echo -dirty)
CPU_IMAGE ?= $(IMAGE_REPO):$(VERSION)-cpu
CUDA_IMAGE ?= $(IMAGE_REPO):$(VERSION)-cuda
# The revision goes in as a label flag too: buildah reuses a cached LABEL layer when only the ARG changed.
IMAGE_ARGS = --build-arg TORCH_VERSION=$(TORCH_VERSION) --build-arg GIT_REVISION=$(GIT_REVISION) \
	--label org.opencontainers.image.revision=$(GIT_REVISION) \
	$(if $(filter local,$(BASE)),--build-arg PYTHON_IMAGE=$(BASE_IMAGE))
CPU_TORCH_ARGS = $(if $(TORCH_WHEELS),--build-arg TORCH_INDEX_URL=,$(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)))

images: images-cuda images-cpu

print-image-cuda:
	@echo $(CUDA_IMAGE)

print-image-cpu:
	@echo $(CPU_IMAGE)

print-base-image:
	@echo $(BASE_IMAGE)

base-image:
	@$(DOCKER) image inspect $(BASE_IMAGE) >/dev/null 2>&1 || \
		DOCKER="$(DOCKER)" BUILD_ARGS="$(BUILD_ARGS)" images/base/build.sh $(BASE_IMAGE)

images-cpu: $(if $(filter local,$(BASE)),base-image)
ifneq ($(TORCH_WHEELS),)
	@ls $(TORCH_WHEELS)/torch-$(TORCH_VERSION)+cpu-*.whl >/dev/null 2>&1 || \
		{ echo "no torch-$(TORCH_VERSION)+cpu-*.whl in TORCH_WHEELS=$(TORCH_WHEELS)" >&2; exit 1; }
	cp -n $(TORCH_WHEELS)/torch-$(TORCH_VERSION)+cpu-*.whl images/wheels/
endif
	$(DOCKER) build $(BUILD_ARGS) $(CPU_BUILD_ARGS) $(IMAGE_ARGS) $(CPU_TORCH_ARGS) \
		-f images/cpu.Dockerfile -t $(CPU_IMAGE) .

images-cuda: $(if $(filter local,$(BASE)),base-image)
	$(DOCKER) build $(BUILD_ARGS) $(CUDA_BUILD_ARGS) $(IMAGE_ARGS) -f images/cuda.Dockerfile -t $(CUDA_IMAGE) .

# Builds the CPU image and runs the project inside it as uid 1000 (images/test.sh says what is checked).
image-test: install
	DOCKER="$(DOCKER)" CPU_IMAGE="$(CPU_IMAGE)" images/test.sh

bench: install-base
	$(PY) bench/edit.py --preset tiny --device cpu --out bench/results/edit_tiny_cpu.json
	$(PY) bench/generate.py --preset tiny --device cpu --dtype float32 --out bench/results/generate_tiny_cpu.json

clean:
	rm -rf $(VENV) demo_output build .pytest_cache
