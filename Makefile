# The two commands of the project: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests run in parallel (pytest-xdist, one worker per core, at most 4); `make test PYTEST_ARGS=` runs serially.
# The 30 slowest tests are listed at the end (where CI time goes).
PYTEST_ARGS ?= -n auto --maxprocesses=4

.PHONY: demo test install install-test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/mamba-jax run icl --preset cpu

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS) --durations=30

bench: $(VENV)/.installed-test
	$(VENV)/bin/mamba-jax bench scan
	$(VENV)/bin/mamba-jax bench hf
	$(VENV)/bin/mamba-jax bench decode
	$(VENV)/bin/mamba-jax bench prefill

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
