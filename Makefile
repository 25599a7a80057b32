# The README's two commands: `make demo` and `make test`. Every install step lives here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
TEST_ARGS ?=
CHAOS_ARGS ?=
BENCH_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PYTHONHASHSEED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install demo test test-all lint bench teacher chaos hostile clean chromium

# Headless Chromium renders the round report in tests/test_report.py: Debian's package, installed where missing.
# Order-only, so it is checked on every run (a millisecond when present) without redoing the pip install.
$(STAMP): pyproject.toml | chromium
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

chromium:
	command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

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

# Every benchmark, one table of ratios with their targets (bench/suite.py: CPU ratios the median of 3 runs, GPU
# rows where CUDA is present), its JSON line last; about 30 minutes on 2 cores. BENCH_ARGS="--quick": a smoke run.
bench: $(STAMP)
	$(PY) bench/suite.py $(BENCH_ARGS)

# Chaos trials: the jobs SIGKILLed or their actors killed at seeded random points, rerun, and compared with an
# uninterrupted run (bench/chaos.py; 20 trials by default, about half an hour on 2 cores).
chaos: $(STAMP)
	$(PY) bench/chaos.py $(CHAOS_ARGS)

# Bad input of every kind through the real components: prints a table and a JSON line; fails on any crash.
hostile: $(STAMP)
	$(PY) bench/hostile.py

# Reproduce the shipped embedded-default teacher (jobs/assets/teacher) from scratch.
teacher: $(STAMP)
	$(PY) -m jobs.teacher --install

clean:
	rm -rf demo-out .pytest_cache build *.egg-info
