# The two commands a new user needs: `make run` and `make test`. Both create the virtual
# environment and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# NATIVE=0 runs the package as plain Python: `make native` then removes the compiled modules instead of
# building them (service/compiled.py says which and why).
NATIVE ?= 1

.PHONY: install native run test lint format bench clean

install: $(STAMP) native

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Compiles the hot-path modules with mypyc when their source changed since the last build (a no-op otherwise).
native: $(STAMP)
ifeq ($(NATIVE),0)
	$(BIN)/python -m service.compiled remove
else
	$(BIN)/python -m service.compiled build
endif

run: $(STAMP) native
	$(BIN)/qbo-webhooks serve

test: $(STAMP) native
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix service tests bench
	$(BIN)/ruff format service tests bench

bench: $(STAMP) native
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache service/*.so service/_compiled.json
