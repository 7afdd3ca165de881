# The README's two commands. Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A torch/torchvision pair that works together (the CPU-only torch 2.13.0 wheel matches no torchvision).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# NVIDIA DALI for the CUDA driver: cuda13 (drivers >= 580) or cuda12 (make DALI=cuda12 ...).
DALI   ?= cuda13

.PHONY: demo test test-fast lint mutants install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,$(DALI)]'
	touch $@

install: $(VENV)/.installed

## Main job on the embedded default: sample data -> shards -> training -> report, under demo/.
demo: $(VENV)/.installed
	$(PY) -m mame_fast demo --out demo

## The test suite (offline, CPU): lint, then every test, on two processes. CI runs this.
test: $(VENV)/.installed lint
	$(PY) -m pytest -q -n 2 --dist worksteal

## The edit loop: the suite without the slow tests (torchrun, subprocess runs, the GPU check's smoke run).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow"

lint: $(VENV)/.installed
	$(PY) -m ruff check .

## Mutation check of the core: each curated mutant must make the tests fail (tests/mutants.py).
mutants: $(VENV)/.installed
	$(PY) tests/mutants.py

clean:
	rm -rf demo runs $(VENV)
