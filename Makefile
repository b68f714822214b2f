# The README's commands. Each one sets up what it needs on a fresh machine (a virtualenv with the
# pinned requirements, the compiled extension), and does nothing it has already done.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := $(VENV)/.stamps
export MAX_JOBS ?= 2
# The datasets: a shared copy beside the repository when there is one, else ./data (downloaded).
export FUSED_MLP_DATA ?= $(if $(wildcard ../shared/data/FashionMNIST/raw),$(abspath ../shared/data),)

SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: install test train bench bench-ops clean

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

test: install
	$(PY) -m pytest tests

train: install
	$(PY) examples/train_fashion.py $(ARGS)

bench: install
	$(PY) -m benchmarks.suite $(ARGS)

bench-ops: install
	$(PY) -m benchmarks.bench_cross_entropy $(ARGS)
	$(PY) -m benchmarks.bench_linear_bn_relu $(ARGS)

clean:
	rm -rf build *.egg-info fused_mlp/_C*.so fused_mlp/_build_info.py $(STAMPS)
