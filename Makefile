# kred: `make test` and `make serve` work on a fresh machine (they build .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch comes from the default index; its CPU build is pinned where the index has one (README: Install)
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml setup.py Makefile | cksum | cut -d' ' -f1)

export RAY_AUTH_MODE ?= disabled
# keep Ray on loopback in tests (else it binds the machine's network address)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0

.PHONY: install test test-gpu gpu-carry gpu-check serve bench docs lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so that the extras keep it (a torch request left to pip may pull a CUDA build: GBs)
	$(PY) -m pip install -q "$(TORCH)"
	# nvrtc and gpu-static: the CUDA wheels the CPU tests need (NVRTC compiles, cuobjdump); CuPy only in test-gpu
	$(PY) -m pip install -q -e ".[torch,nvrtc,gpu-static,server,bench,test,docs,examples,clients,lint]"
	# TorchDR's and GPyTorch's tests ship only in their sdists: the installed versions', for test_client_suites.py
	$(PY) -m pip download -q --no-deps --no-binary :all: -d $(VENV)/sdists $$($(PY) -c \
		'import importlib.metadata as m; print(*(p + "==" + m.version(p) for p in ("torchdr", "gpytorch")))')
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest -q -ra --durations=15

test-gpu: install
	# CuPy for the cuda backend (the GPU tests need it; torch's CUDA tests need a CUDA build of torch);
	# the GPU test files are listed in benchmarks/gpu_check.py (none needs Ray or FastAPI)
	$(PY) -m pip install -q -e ".[cuda]"
	$(PY) -m pytest -q -ra -m gpu $$($(PY) -c "from benchmarks.gpu_check import GPU_TEST_FILES; print(*GPU_TEST_FILES)")

# Pure-Python wheels the lent GPU machine lacks (it has no network): benchmarks.gpu_check puts them on the path.
gpu-carry:
	rm -rf .carry && mkdir -p .carry
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .carry \
		"platformdirs>=3" "cachetools>=5"
	# pykeops and keopscore (KeOps in the same benchmark run) are published as pure-Python sources: built here
	$(PYTHON) -m pip wheel -q --no-deps -w .carry "pykeops==2.3" "keopscore==2.3"

# On the lent machine, from the source tree: python3 -m benchmarks.gpu_check --out "$$OUT" (no install)
gpu-check:
	python3 -m benchmarks.gpu_check

serve: install
	$(VENV)/bin/kred serve

bench: install
	$(PY) -m benchmarks.run

# ruff, configured in pyproject.toml ([tool.ruff]: pyflakes and syntax errors)
lint: install
	$(VENV)/bin/ruff check .

# the documentation site, offline, into site/ (warnings are errors: mkdocs.yml sets strict)
docs: install
	PYTHONPATH=$(CURDIR) $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
