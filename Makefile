# Two commands do everything on a fresh machine with Python 3.10+:
#   make demo   set up, fetch the default model offline, watch TOVA decode step by step
#   make test   set up, fetch the default model, run the test suite
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch lies on disk on our machines; a plain `pip install torch` would pull a
# multi-GB CUDA build. Users with a GPU: make TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
MODEL  ?= weights/SmolLM2-135M-Instruct
# pytest-xdist workers for `make test`: one per core (tests/conftest.py gives each one torch
# thread); JOBS=0 runs the tests in one process
JOBS   ?= auto
BIN    := $(VENV)/bin

.PHONY: setup model demo test bench clean

setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[test,lm-eval,ray]"
	touch $@

model: setup
	$(BIN)/msrnn fetch-default --dir $(MODEL)

demo: model
	$(BIN)/python scripts/step_by_step.py $(MODEL) --chat --prompt "What is the capital of France?" --policy tova --size 32 --layer 15 --max-new-tokens 12

test: model
	$(BIN)/python -m pytest -q -n $(JOBS) tests

bench: model
	$(BIN)/msrnn bench $(MODEL) --out results/bench

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
