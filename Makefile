# Two commands from a fresh clone: `make run` (every notebook on the tiny model) and `make test` (the
# quick suite). Both install first, into .venv, with the standard venv module. `make test-all` is the
# full suite (what CI runs).

PYTHON ?= python3
VENV ?= .venv
# torch from the package index (on Linux: the CUDA build); the CPU-only build:
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu`; the newest: TORCH=torch (see README.md).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
KERNEL ?= flux-decoupled
# The model every notebook uses in `make run` (tiny, medium, flux-dev, flux-schnell, a hub id, a folder).
FLUX_MODEL ?= tiny
PYTEST_ARGS ?=
# extra flags for `make lab`, e.g. LAB_ARGS="--no-browser --port 8899"
LAB_ARGS ?=
# the budget of `make bench-gpu` (the method's)
GPU_BUDGET ?= 0=8.5GiB,cpu=30GiB

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser || echo /usr/bin/chromium)

.PHONY: help install run test test-all test-browser bench-gpu lab kernel clean distclean

help:
	@echo "make install   create .venv and install the project (TORCH=$(TORCH))"
	@echo "make run       execute every notebook on FLUX_MODEL=$(FLUX_MODEL); executed copies in outputs/executed/"
	@echo "make test      the quick suite: every module of helpers, every notebook once through nbval"
	@echo "make test-all  the full suite (RUN_SLOW=1): adds sweeps, benchmarks and real-process runs; what CI runs"
	@echo "make test-browser  the workshop in JupyterLab, driven in Chromium (needs the chromium package)"
	@echo "make bench-gpu the full-size benchmarks on a GPU machine (writes flux-dev-random: 34 GB of disk)"
	@echo "make lab       JupyterLab on the project's kernel"
	@echo "make kernel    register the '$(KERNEL)' kernel for a Jupyter outside .venv"
	@echo "make clean     remove what the notebooks made (outputs/), keeping outputs/README.md"

# Idempotent: reinstalls only when pyproject.toml, TORCH or TORCH_INDEX changed since the last install.
install:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@want="$(TORCH)$(if $(TORCH_INDEX), $(TORCH_INDEX)) $$(cksum < pyproject.toml)"; \
	if [ "$$(cat $(STAMP) 2>/dev/null)" = "$$want" ]; then \
	  echo "install: $(VENV) is up to date ($(TORCH))"; \
	else \
	  set -e; \
	  $(BIN)/python -m pip install --quiet --upgrade pip; \
	  $(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)"); \
	  $(BIN)/python -m pip install --quiet -e ".[test]"; \
	  $(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python 3 ($(KERNEL))" >/dev/null; \
	  echo "$$want" > $(STAMP); \
	  echo "install: done; torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	fi

# each notebook on a fresh kernel, in order, from one process (scripts/run-notebooks.py), with its time
run: install
	@FLUX_MODEL="$(FLUX_MODEL)" $(BIN)/python scripts/run-notebooks.py --kernel $(KERNEL) --out outputs/executed \
	  --label "FLUX_MODEL=$(FLUX_MODEL)" $(NOTEBOOKS)

test: install
	FLUX_MODEL=tiny $(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install
	RUN_SLOW=1 FLUX_MODEL=tiny $(BIN)/python -m pytest $(PYTEST_ARGS)

test-browser: install
	@test -x "$(CHROMIUM)" || { echo "test-browser needs Chromium: sudo apt-get install chromium (or CHROMIUM=/path/to/chromium)" >&2; exit 1; }
	FLUX_BROWSER_TESTS=1 CHROMIUM="$(CHROMIUM)" $(BIN)/python -m pytest tests/browser -s $(PYTEST_ARGS)

# On a GPU machine (install with TORCH=torch): the tests that need CUDA, then FLUX.1-dev's transformer
# (random weights) at 1024x1024 in bf16 and fp8 and T5 on one 512-token prompt, each step time-limited
# so the whole check ends within 9 minutes (scripts/gpu-check.sh; its `prepare` half fetches the wheels
# a bare GPU machine lacks). JSON and a log go to outputs/benchmarks/.
bench-gpu: install
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu needs a GPU that torch can use')"
	PYTHON=$(BIN)/python bash scripts/gpu-check.sh run outputs/benchmarks

lab: install
	$(BIN)/jupyter lab --notebook-dir=notebooks --MultiKernelManager.default_kernel_name=$(KERNEL) \
	  $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

kernel: install
	$(BIN)/python -m ipykernel install --user --name $(KERNEL) --display-name "Python 3 ($(KERNEL))"

clean:
	find outputs -mindepth 1 -not -name README.md -delete

distclean: clean
	rm -rf $(VENV) *.egg-info .pytest_cache
