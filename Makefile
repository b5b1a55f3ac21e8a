# Quick start: `make bench` runs the benchmark, `make test` runs the tests. Both create the
# virtual environment .venv and install everything (requirements.txt, then `pip install -e .`)
# the first time, so they work on a fresh machine with Python 3.10+.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mfm_fast_installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test bench info clean

$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.cuh csrc/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest --benchmark-disable $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/fft_mask.py $(BENCH_ARGS)

info: $(STAMP)
	$(BIN)/python -m mfm_fast.info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks mfm_fast/_C*.so mfm_fast/_build_info.json
