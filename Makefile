# editinfinity: one entry point for people and CI.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned on this install path: an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export EDITINFINITY_PARITY_DIR ?= $(abspath ../shared/parity)
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install install-base test test-gpu mutation lint demo compile images bench clean

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
	$(VENV)/bin/editinfinity demo --out demo_output

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_REPO ?= ghcr.io/editinfinity/editinfinity

compile: install
	$(PY) -m pipelines.compile --all --out build/pipelines

images:
	docker build -f images/cuda.Dockerfile -t $(IMAGE_REPO):$(VERSION)-cuda .
	docker build -f images/cpu.Dockerfile -t $(IMAGE_REPO):$(VERSION)-cpu .

bench: install-base
	$(PY) bench/edit.py --preset tiny --device cpu --out bench/results/edit_tiny_cpu.json
	$(PY) bench/generate.py --preset tiny --device cpu --dtype float32 --out bench/results/generate_tiny_cpu.json

clean:
	rm -rf $(VENV) demo_output build .pytest_cache
