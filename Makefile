# Quick start: `make bench` runs the benchmark, `make test` runs the tests. Both create the virtual
# environment .venv and install everything the first time (requirements.txt at the exact versions of
# constraints.txt, then `pip install -e .`), so they work on a fresh machine with Python 3.10+. `make test` and
# `make test-fast` also install tools/requirements.txt once (the kernel tools' own, which the tests cover).
# Without a GPU, `make bench` leaves the CUDA extension to its just-in-time build (nothing to compile);
# `make test` builds it once ahead of time (about 2 minutes on 2 cores), since the tests run its host build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mfm_fast_installed
EXT_STAMP := $(VENV)/.mfm_fast_cuda_ext
TOOLS_STAMP := $(VENV)/.mfm_fast_tools_installed
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=
JOBS ?= auto
BENCH_ARGS ?=
# 1 where a GPU is visible: then the first install builds the CUDA extension for it at once.
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.cuh csrc/*.h)

# $(call quietly,WHAT,COMMAND): run COMMAND, printing "make: still WHAT (N s)" every 10 s while it is silent.
quietly = ( t=0; while sleep 10; do t=$$((t + 10)); echo "make: still $(1) ($$t s)"; done ) & hb=$$!; \
	$(2); rc=$$?; kill $$hb 2>/dev/null; exit $$rc

.PHONY: install test test-fast bench info lock clean

$(STAMP): requirements.txt constraints.txt $(SOURCES)
	@echo "make: installing into $(VENV) (first time: torch and the other pinned requirements, about 1-2 minutes;"
	@echo "      --no-compile: Python compiles each module when it is first imported instead)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(call quietly,installing the requirements into $(VENV),$(PIP) install --no-compile -r requirements.txt -c constraints.txt)
	@echo "make: pip install -e . $(if $(HAVE_GPU),(builds the CUDA extension for the visible GPU: 1-3 minutes),(no GPU visible: the CUDA extension is left to its just-in-time build))"
	MFM_FAST_DEFER_CUDA_BUILD=$(if $(HAVE_GPU),0,1) $(PIP) install -e . -c constraints.txt
	rm -f $(EXT_STAMP)
	touch $(STAMP)

# The ahead-of-time CUDA extension (host build of its kernels for the CPU tests; sm_90 code for H100 / H200).
$(EXT_STAMP): $(STAMP)
	@if $(BIN)/python -c "import json, sys; sys.exit(json.load(open('mfm_fast/_build_info.json'))['status'] != 'built')" 2>/dev/null; then \
	  echo "make: the CUDA extension is already built"; else \
	  echo "make: building the CUDA extension ahead of time (about 2 minutes on 2 cores, once)"; \
	  $(call quietly,compiling the CUDA extension,MFM_FAST_DEFER_CUDA_BUILD=0 $(PIP) install -q -e . --no-deps \
	    --no-build-isolation -c constraints.txt); fi
	touch $(EXT_STAMP)

# The kernel tools' requirements (tools/requirements.txt: nvidia-mathdx for tools/cufftdx_plane.py), once; the
# tests need them, the benchmark does not. Order-only on $(STAMP): the venv must exist, a reinstall of the
# user requirements does not repeat this.
$(TOOLS_STAMP): tools/requirements.txt constraints.txt | $(STAMP)
	@echo "make: installing the kernel tools' requirements (tools/requirements.txt) into $(VENV)"
	@$(call quietly,installing tools/requirements.txt into $(VENV),$(PIP) install --no-compile -r tools/requirements.txt -c constraints.txt)
	touch $(TOOLS_STAMP)

install: $(EXT_STAMP)

test: $(EXT_STAMP) $(TOOLS_STAMP)
	$(BIN)/python -m pytest --benchmark-disable $(PYTEST_ARGS)

# Everything but the tests marked slow (fresh-venv installs, real compiles, training runs), on every core.
test-fast: $(EXT_STAMP) $(TOOLS_STAMP)
	$(BIN)/python -m pytest --benchmark-disable -m "not slow" -n $(JOBS) $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/fft_mask.py $(BENCH_ARGS)

info: $(STAMP)
	$(BIN)/python -m mfm_fast.info

# Refresh constraints.txt on purpose: the newest releases of requirements.txt and tools/requirements.txt (within
# their ranges), of pip and of the packages the install tests fetch (PyPI's kernels), resolved in a fresh venv.
# Review the diff, run make test.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -U pip
	.venv-lock/bin/python -m pip install -r requirements.txt -r tools/requirements.txt kernels
	{ grep '^#' constraints.txt; .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v '^mfm.fast'; } \
	  > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf .venv-lock
	@echo "make: constraints.txt rewritten; git diff constraints.txt"

clean:
	rm -rf $(VENV) .venv-lock build *.egg-info .pytest_cache .benchmarks mfm_fast/_C*.so mfm_fast/_build_info.json
