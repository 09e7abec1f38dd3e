# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
# `make test-fast`: the tests that do not start Ray (tests/core, tests/study), a few minutes on 2 cores.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast bench bench-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(PY) -m study.run quickstart

test: venv
	$(PY) -m pytest -q --durations=15

test-fast: venv
	$(PY) -m pytest -q -m "not ray" --durations=10 tests/core tests/study

bench: venv
	$(PY) -m benchmarks

bench-quick: venv
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) build *.egg-info
