#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA GPU and torch already
# installed (no venv, no registry needed): build the extension in place against
# that torch, run the test suite (the CUDA cases run there, they skip elsewhere),
# then the kernel, scaling and training-step benchmarks on the GPU. The benchmarks run
# even if a test fails; the script exits with the tests' status.
#
#   bash benchmarks/run_gpu.sh [results-dir]     # default: benchmarks/results
#
# Needs the CUDA toolkit (nvcc) as well as torch. PYTHON chooses the
# interpreter (default python3). Python packages of requirements.txt that the
# machine lacks (pytest, numpy, tqdm, matplotlib, scikit-learn, mlxtend: the
# device image used so far lacks only mlxtend) can be put as wheels in .whl/
# (git ignores it): they are installed, without dependencies, into a scratch
# directory first, e.g. after, on a machine with pip access,
#   pip download --no-deps --only-binary=:all: -d .whl mlxtend==0.25.0
set -uo pipefail
OUT=$(realpath -m "${1:-$(dirname "$0")/results}")  # relative to the caller's directory
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || exit
if ! command -v nvcc > /dev/null && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    echo "run_gpu.sh: no CUDA toolkit (nvcc on PATH or in \$CUDA_HOME/bin) to build the CUDA kernels" >&2
    exit 1
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ater_ext_site .whl/*.whl || exit
    export PYTHONPATH="/tmp/ater_ext_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export FORCE_CUDA=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
arch=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')} || exit
export TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-8}
"$PY" setup.py build_ext --inplace || exit
"$PY" -m pytest python_tests -q
tests=$?
"$PY" benchmarks/bench_ops.py --device cuda --out "$OUT" || exit
"$PY" benchmarks/bench_scaling.py --device cuda --out "$OUT" || exit
"$PY" benchmarks/bench_step.py --device cuda --out "$OUT" || exit
exit $tests
