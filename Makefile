# Two set-up commands work on a fresh machine: `make serve` and `make test`.
# A GPU user picks the torch build: make serve TORCH_SPEC="torch==2.9.1" TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install dev serve test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) -e ".[dev,onnx]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

serve: install
	$(VENV)/bin/bgeserve serve

test: dev
	$(PY) -m pytest -q

lint: dev
	$(VENV)/bin/ruff check bgeserve tests scripts

bench: dev
	$(VENV)/bin/bgeserve bench --synthetic full --corpus bgeserve/data/mixed.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
