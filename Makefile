# The README's two commands. Each creates .venv on first use and installs what it needs.
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A torch/torchvision pair that works together (the CPU-only torch 2.13.0 wheel matches no torchvision).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# NVIDIA DALI for the CUDA driver: cuda13 (drivers >= 580), cuda12 (make DALI=cuda12 ...), or none (the fallback loader).
DALI   ?= cuda13
comma  := ,
EXTRAS := test$(if $(filter none,$(DALI)),,$(comma)$(DALI))
# The second environment of `make test`: the same install without DALI, as on machines where no DALI wheel exists.
NODALI := .venv-nodali

.PHONY: demo test test-fast test-nodali lint mutants install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

$(NODALI)/.installed: pyproject.toml
	$(PYTHON) -m venv $(NODALI)
	$(NODALI)/bin/python -m pip install -q --upgrade pip
	$(NODALI)/bin/python -m pip install -q $(TORCH)
	$(NODALI)/bin/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

## Main job on the embedded default: sample data -> shards -> training -> report, under demo/.
demo: $(VENV)/.installed
	$(PY) -m mame_fast demo --out demo

## The test suite (offline, CPU): lint, every test on two processes, the SLURM jobs on their own (they use the node's
## cores, which the timed tests must not share), then the fast part again without DALI. CI runs this.
test: $(VENV)/.installed lint
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slurm"
	$(PY) -m pytest -q -m slurm -rs
	$(MAKE) test-nodali

## The suite's fast part in an environment without DALI: the fallback serves every loader test, DALI's skip with a reason.
test-nodali: $(NODALI)/.installed
	$(NODALI)/bin/python -m pytest -q -n 2 --dist worksteal -m "not slow" -rs | tee $(NODALI)/last.log
	@awk '/^SKIPPED.*DALI/ {gsub(/[^0-9]/, "", $$2); n += $$2} END {print "tests skipped for no DALI: " n + 0}' $(NODALI)/last.log

## The edit loop: the suite without the slow tests (torchrun, subprocess runs, the GPU check's smoke run).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow"

lint: $(VENV)/.installed
	$(PY) -m ruff check .

## Mutation check of the core: each curated mutant must make the tests fail (tests/mutants.py).
mutants: $(VENV)/.installed
	$(PY) tests/mutants.py

## What make made: the environments and the demo. Never runs/ (a user's experiments, cards and test ledger) or shards/.
clean:
	rm -rf demo $(VENV) $(NODALI)
