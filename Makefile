# effnlp_ext — the two commands a user needs:  make demo  |  make test
SHELL := /bin/bash
PY_SYS ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.deps-installed
CUDA_VENV ?= .venv-cuda
export OMP_NUM_THREADS ?= 2

.PHONY: all venv build test bench bench-quick demo cuda-check cmake-check clean

all: build

$(STAMP): requirements.txt
	$(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# Incremental in-place build of effnlp_ext._C (no build isolation: uses the venv's torch).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) -m pytest -q bench --benchmark-only -p no:cacheprovider

bench-quick: build
	EFFNLP_BENCH_QUICK=1 $(PY) -m pytest -q bench --benchmark-only -p no:cacheprovider

demo: build
	$(PY) -m effnlp_ext.cli demo

# Compiles every .cu against the CUDA 13.0 build of torch and checks that each op has a CUDA
# kernel in the dispatcher. Needs nvcc, no GPU.
cuda-check:
	bash scripts/cuda_check.sh $(CUDA_VENV)

# Builds the same op library with CMake (find_package(Torch)) and loads it.
cmake-check: build
	bash scripts/cmake_check.sh $(PY)

clean:
	rm -rf build build-cmake effnlp_ext/*.so
