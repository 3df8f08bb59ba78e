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
	$(PIP) -e ".[dev,onnx,ray]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

serve: install
	$(VENV)/bin/bgeserve serve

test: dev
	$(PY) -X faulthandler -m pytest -q

lint: dev
	$(VENV)/bin/ruff check bgeserve tests scripts
	$(VENV)/bin/mypy  # packages and settings: [tool.mypy] in pyproject.toml

# Short: 16 texts of the corpus, our configs, transformers fp32 as the peer (BENCHMARKS.md has timings).
# More: make bench BENCH_ARGS="--compare flagembedding,transformers,onnxruntime --json out.json --plot out.png"
BENCH_ARGS ?=
bench: dev
	$(VENV)/bin/bgeserve bench --synthetic full --corpus bgeserve/data/mixed.txt \
		--configs cpu-fp32-t1,cpu-fp32,cpu-bf16,cpu-int8,onnx-fp32,onnx-int8,cuda-fp16,cuda-bf16 \
		--compare transformers-fp32 --limit 16 --batch 4 --repeats 2 --query-runs 5 --batch-runs 2 $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
