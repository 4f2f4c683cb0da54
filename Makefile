# kred: `make test` and `make serve` work on a fresh machine (they build .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml setup.py Makefile | cksum | cut -d' ' -f1)

export RAY_AUTH_MODE ?= disabled

.PHONY: install test test-gpu serve bench docs lint clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch is pinned: any other torch request downloads GBs of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[torch,nvrtc,gpu-static,server,bench,test,docs,examples]"
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest -q -ra --durations=15

test-gpu: install
	# CuPy for the cuda backend (the GPU tests need it; torch's CUDA tests need a CUDA build of torch)
	$(PY) -m pip install -q -e ".[cuda]"
	$(PY) -m pytest -q -ra -m gpu

serve: install
	$(VENV)/bin/kred serve

bench: install
	$(PY) -m benchmarks.run

# the documentation site, offline, into site/ (warnings are errors: mkdocs.yml sets strict)
docs: install
	PYTHONPATH=$(CURDIR) $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
