"""Loads the compiled extension (registering torch.ops.ater_ext.*), checks
that this CPU can run the SIMD code it was built for, and applies the
ATER_EXT_CUDA_LAYOUT environment variable (see ater_ext.ops.set_cuda_layout)."""
import os

import torch

_SUPPORTED = {
    "default": lambda: True,
    "avx2": torch.cpu._is_avx2_supported,
    "avx512": torch.cpu._is_avx512_supported,
    "avx512_bf16": lambda: torch.cpu._is_avx512_supported() and torch.cpu._is_avx512_bf16_supported(),
}

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "ater_ext: the compiled extension ater_ext._C is missing or was built against another torch "
        f"(torch here: {torch.__version__}). Rebuild it with `pip install --no-build-isolation -e .` "
        f"or `make build`. Original error: {exc}"
    ) from exc

BUILD_CPU_ISA = _C.cpu_isa()
if not _SUPPORTED[BUILD_CPU_ISA]():  # pragma: no cover - depends on the machine
    raise ImportError(
        f"ater_ext: the CPU kernels were compiled for {BUILD_CPU_ISA}, which this CPU does not support; "
        "rebuild for a lower one: ATER_EXT_CPU_ISA=avx512, avx2 or default "
        "`pip install --no-build-isolation -e .`"
    )

_LAYOUT = os.environ.get("ATER_EXT_CUDA_LAYOUT")
if _LAYOUT:
    try:
        _C.set_cuda_layout(_LAYOUT)
    except ValueError:
        raise ValueError(f"ater_ext: ATER_EXT_CUDA_LAYOUT must be 'rows' or 'adaptive', got {_LAYOUT!r}") from None
