# The two commands a newcomer runs on a fresh machine.
# Both use one venv, made by whichever runs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The main job: an offline demo on the embedded in-memory store.
demo: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[tiktoken,langgraph,cli]'
	$(BIN)/tbc demo

# Everything: install all extras and dev tools, lint, type-check, run every test.
test: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,langchain,langgraph,crewai]'
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

bench: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) build *.egg-info
