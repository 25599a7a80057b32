# The README's two commands: `make demo` and `make test`. Every install step lives here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
TEST_ARGS ?=
export PYTHONHASHSEED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-all lint bench teacher chaos clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo $(DEMO_ARGS)

# The default suite: unit + smoke + golden tests (slow and gpu excluded); lint first, it is cheap.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow and not gpu" -q $(TEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(TEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/model_forward.py
	$(PY) bench/ingest.py
	$(PY) bench/label.py

# Reproduce the shipped embedded-default teacher (jobs/assets/teacher) from scratch.
teacher: $(STAMP)
	$(PY) -m jobs.teacher --install

clean:
	rm -rf demo-out .pytest_cache build *.egg-info
