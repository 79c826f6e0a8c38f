# editinfinity: one entry point for people and CI.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned on this install path: an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export EDITINFINITY_PARITY_DIR ?= $(abspath ../shared/parity)
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install install-base test lint demo compile images bench clean

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
