# The README's commands. Each one sets up what it needs on a fresh machine (a virtualenv with the
# pinned requirements, the compiled extension), and does nothing it has already done.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := $(VENV)/.stamps
export MAX_JOBS ?= 2
# The datasets: a shared copy beside the repository when there is one, else ./data (downloaded).
export FUSED_MLP_DATA ?= $(if $(wildcard ../shared/data/FashionMNIST/raw),$(abspath ../shared/data),)

CXX_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
SOURCES := setup.py pyproject.toml $(CXX_SOURCES)
# What clang-format checks: the extension's sources and the simulation's tests.
FORMATTED := $(CXX_SOURCES) $(shell find tests/sim -name '*.cpp' -o -name '*.h')

.PHONY: install test train train-ddp bench bench-ops lint format clean gpu-check compat

install: $(STAMPS)/build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/deps: requirements.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.txt
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/build: $(STAMPS)/deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	@touch $@

$(STAMPS)/lint-deps: requirements-lint.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements-lint.txt
	@mkdir -p $(STAMPS) && touch $@

# Style checks, no build: ruff (lint and format) over the Python, clang-format over the C++/CUDA.
lint: $(STAMPS)/lint-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(FORMATTED)

# Rewrites the tree in the house style.
format: $(STAMPS)/lint-deps
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(FORMATTED)

test: install
	$(PY) -m pytest tests

train: install
	$(PY) examples/train_fashion.py $(ARGS)

# The same training in 2 processes on the CPU (DistributedDataParallel over gloo), BatchNorm over the global batch.
train-ddp: install
	$(VENV)/bin/torchrun --standalone --nproc_per_node=2 examples/train_fashion.py --sync-bn $(ARGS)

$(STAMPS)/bench-deps: requirements-bench.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements-bench.txt
	@mkdir -p $(STAMPS) && touch $@

# The suite against the stock modules and torch.compile, then against JAX and ONNX Runtime.
bench: install $(STAMPS)/bench-deps
	$(PY) -m benchmarks.suite $(ARGS)
	$(PY) -m benchmarks.peers

bench-ops: install
	$(PY) -m benchmarks.bench_cross_entropy $(ARGS)
	$(PY) -m benchmarks.bench_linear_bn_relu $(ARGS)

# The CUDA kernels on this machine's GPU in one command (tools/gpu_check.py): build in place, the
# ptxas resource check, the GPU tests, compute-sanitizer, the GPU benchmarks, benchmarks/results/gpu.md.
# Installs nothing, and builds against the torch already installed: the venv's if there is one, else
# that of $(PYTHON). Without a GPU: a dry run of its plumbing (CI runs it).
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) tools/gpu_check.py $(ARGS)

# The CPU parity tests built and run against other torch releases, each in a venv of its own under
# build/compat (a few GB each): the oldest supported and the newest.
COMPAT_TORCH ?= 2.11.0 2.15.0
compat:
	$(PYTHON) tools/compat.py $(COMPAT_TORCH)

clean:
	rm -rf build *.egg-info fused_mlp/_C*.so fused_mlp/_build_info.py $(STAMPS)
