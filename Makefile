# Two commands: `make lab` (install, then JupyterLab on the notebooks) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sdkit-installed
ARGS ?=
# glibc's malloc settings that let each UNet step reuse the last one's memory (sdkit/allocator.py); read at start.
# SDKIT_KEEP_MALLOC=1 keeps glibc's defaults.
MALLOC_TUNABLES := $(if $(filter 1,$(SDKIT_KEEP_MALLOC)),,GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=2147483647)
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

# PyTorch: the CPU build by default, torch with the torchvision made for it (spandrel, which
# loads upscale models, imports torchvision). On a machine whose pip already has this pair on
# local disk (this project's build machines: a local index under /opt) that copy is used;
# elsewhere pip asks PyTorch's CPU wheel index. ROCm: make lab TORCH_INDEX=https://download.pytorch.org/whl/rocm6.4
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
TORCH_LOCAL := $(wildcard /opt/pypi*/simple/torch/index.html)
ifeq ($(strip $(TORCH_LOCAL)),)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
endif
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: lab test fuzz browser-test notebooks install clean-venv

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml tools/jupyterlab/overrides.json Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -r requirements.txt -e .
	@# The course's JupyterLab settings: no news or update pop-ups on first start.
	mkdir -p $(VENV)/share/jupyter/lab/settings
	cp tools/jupyterlab/overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	@touch $@

lab: $(STAMP)
	@# Once per machine: which precision and memory layout run the UNet fastest here (sdkit.speed, ~15 s).
	$(PY) -m sdkit device --measure missing
	@echo "Starting JupyterLab on notebooks/ (the URL with its token is printed below)."
	$(MALLOC_TUNABLES) $(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ROOT_FLAG) $(ARGS)

# One pytest worker per core (up to 4; each notebook and test file stays in one worker), each with one torch thread:
# most tests run tiny models whose time is Python's, not arithmetic's, so this halves the run on 2 cores.
test: $(STAMP)
	$(MALLOC_TUNABLES) HF_HUB_OFFLINE=1 MPLBACKEND=Agg OMP_NUM_THREADS=1 $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env \
	  -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile

# The fuzz tests with tens of thousands of examples each (over 100,000 in all; SDKIT_FUZZ_EXAMPLES per test).
fuzz: $(STAMP)
	HF_HUB_OFFLINE=1 HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/test_fuzz.py -p no:cacheprovider -q --hypothesis-show-statistics

clean-venv:
	rm -rf $(VENV)

# JupyterLab in a real browser (Debian's chromium driven by playwright): notebooks 01, 05 and 09 run, then their panels used.
browser-test: $(STAMP)
	@command -v chromium >/dev/null || test -x "$${CHROMIUM:-/usr/bin/chromium}" || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "browser-test needs Debian's chromium: sudo apt-get install chromium"; exit 1; fi; }
	$(PY) -m pip install --quiet -r requirements-browser.txt
	HF_HUB_OFFLINE=1 $(PY) -m pytest browser -p no:cacheprovider -s

# Rewrite notebooks/ from tools/notebooks/*.py, running each one so the saved notebooks carry their pictures.
notebooks: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) tools/build_notebooks.py --execute
