# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Train a small masked diffusion model on the embedded Wikipedia corpus, then print samples and a likelihood.
demo: $(STAMP)
	$(VENV)/bin/smdm demo

# The whole test suite (a few minutes on 2 cores); tests that need ../shared/data skip without it.
test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf runs $(VENV)
