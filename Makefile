# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench fuzz clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,lightning,accelerate,transformers]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gradwatch demo --logdir runs/gradwatch-demo
	-$(PY) -m gradwatch demo --bug missing-zero-grad --logdir runs/gradwatch-demo-bug

test: $(STAMP)
	$(PY) -m ruff check gradwatch tests examples benchmarks
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/overhead.py --json benchmarks/results.json

LOOPS ?= 1000
SEEDS ?= 0 1 2 3 4
fuzz: $(STAMP)
	$(PY) tests/fuzzing/fuzz.py --loops $(LOOPS) --seed $(SEEDS)

lint: $(STAMP)
	$(PY) -m ruff check gradwatch tests examples benchmarks
	$(PY) -m ruff format --check gradwatch tests examples benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
