# Two commands (README quick start): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench setup-demo setup-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[samples]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test,samples]"
	touch $@ $(VENV)/.demo-installed

setup-demo: $(VENV)/.demo-installed
setup-test: $(VENV)/.test-installed

demo: setup-demo
	$(BIN)/lrponnx demo -o demo_out

test: setup-test
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

$(VENV)/.bench-installed: pyproject.toml | $(VENV)/.test-installed
	$(BIN)/pip install -q -e ".[test,samples,bench]"
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
