#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA GPU and torch already
# installed (no venv, no registry needed): build the extension in place against
# that torch, run the test suite (the CUDA cases run there, they skip elsewhere),
# then the kernel and training-step benchmarks on the GPU.
#
#   bash benchmarks/run_gpu.sh [results-dir]     # default: benchmarks/results
#
# Set PYTHON to choose the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-benchmarks/results}
export FORCE_CUDA=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PY" setup.py build_ext --inplace -j 8
"$PY" -m pytest python_tests -q -x
"$PY" benchmarks/bench_ops.py --device cuda --out "$OUT"
"$PY" benchmarks/bench_step.py --device cuda --out "$OUT"
