# Two commands (README quick start): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench setup-demo setup-test setup-js clean

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

# Node and browser runtimes for tests/test_runtimes.py (needs node and npm; chromium for the browser
# cases). --ignore-scripts: onnxruntime-node's install script downloads CUDA files from a host that
# is not reachable, and the CPU binding ships in the package anyway.
tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

setup-js: tests/js/node_modules/.installed

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
	rm -rf $(VENV) demo_out .pytest_cache tests/js/node_modules
