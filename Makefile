# editinfinity: one entry point for people and CI.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# torch is pinned on this install path: an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export EDITINFINITY_PARITY_DIR ?= $(abspath ../shared/parity)

.PHONY: install test lint demo compile images bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check core tests bench components pipelines

demo: install
	$(VENV)/bin/editinfinity demo --out demo_output

clean:
	rm -rf $(VENV) demo_output .pytest_cache
