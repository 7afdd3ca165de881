# The README's two commands. Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A torch/torchvision pair that works together (the CPU-only torch 2.13.0 wheel matches no torchvision).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

## Main job on the embedded default: sample data -> shards -> training -> report, under demo/.
demo: $(VENV)/.installed
	$(PY) -m mame_fast demo --out demo

## The test suite (offline, CPU).
test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf demo runs $(VENV)
