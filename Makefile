# ater_ext: `make test` and `make demo` work on a fresh machine with Python 3.11.
# Each step is guarded by a stamp so that re-running is cheap: the venv is made
# once, requirements are reinstalled only when requirements.txt changes, and the
# extension is rebuilt only when csrc/ or the build files change.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ext-built

# CUDA kernels are compiled whenever nvcc is found (CI compiles them too, so a
# .cu that does not compile fails CI); without a toolkit the build is CPU-only.
CUDA_HOME ?= $(shell if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; else d=$$(command -v nvcc); [ -n "$$d" ] && dirname $$(dirname $$d); fi)
FORCE_CUDA ?= $(if $(CUDA_HOME),1,0)
export CUDA_HOME FORCE_CUDA

CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: venv build test demo bench clean

venv: $(DEPS_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(CSRC) setup.py pyproject.toml
	@echo "building ater_ext (FORCE_CUDA=$(FORCE_CUDA), CUDA_HOME=$(CUDA_HOME))"
	$(PY) -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: build
	$(PY) -m pytest python_tests -q

# The README's main command: ERM / AT / ATER on the embedded MNIST subset -> results/demo/
demo: build
	$(PY) -m ater_ext.cli.demo --out results/demo

bench: build
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_scaling.py
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_methods.py

clean:
	rm -rf build ater_ext/*.so *.egg-info $(BUILD_STAMP)
