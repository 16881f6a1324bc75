# morphotype: `make demo` runs the main job on the shared demo data, `make test` runs every test.
# Both install into .venv first when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
MORPHOTYPE_SHARED ?= $(abspath ../shared)
OUTDIR ?= results
export MORPHOTYPE_SHARED
export NUMBA_CACHE_DIR ?= $(abspath .cache/numba)
export MPLCONFIGDIR ?= $(abspath .cache/matplotlib)

STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: install demo test lint-nextflow clean

install: $(STAMP)

# torch first, from the CPU wheel: anything else asking for torch would pull CUDA builds.
$(STAMP): pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements/lock.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	touch $@

demo: install
	$(BIN)/morphotype run examples/mitocheck_crops.yaml --outdir $(OUTDIR) \
		--mitocheck_crops $(MORPHOTYPE_SHARED)/data/mitocheck_crops

test: install
	$(BIN)/python -m pytest -n 2 tests

clean:
	rm -rf $(VENV) .cache results
