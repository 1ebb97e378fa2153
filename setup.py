"""Build ater_ext's C++ (and, when asked for or possible, CUDA) extension.

CUDA sources are compiled when a GPU and a CUDA toolkit are present, or when
FORCE_CUDA=1 (CI does this so that a .cu that does not compile fails CI).
TORCH_CUDA_ARCH_LIST is honoured; the default covers sm_80 and sm_90.
The CPU kernels use at::vec with the widest ISA the build machine supports
(the package is built from source where it runs; avx512_bf16 adds the
native bf16 conversion where the CPU has it); set
ATER_EXT_CPU_ISA=default|avx2|avx512|avx512_bf16 to choose another.
"""
import glob
import os
import platform

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))

CPU_ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}
# AVX512 plus the native fp32 -> bf16 conversion (row_ops_cpu.cpp's bf16 stores)
CPU_ISA_FLAGS["avx512_bf16"] = CPU_ISA_FLAGS["avx512"] + ["-mavx512bf16", "-DATER_EXT_NATIVE_BF16"]


def cpu_isa() -> str:
    requested = os.environ.get("ATER_EXT_CPU_ISA")
    if requested:
        if requested not in CPU_ISA_FLAGS:
            raise SystemExit(f"ATER_EXT_CPU_ISA must be one of {sorted(CPU_ISA_FLAGS)}, got {requested!r}")
        return requested
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if capability == "avx512" and torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return capability if capability in CPU_ISA_FLAGS else "default"


def with_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def extension():
    isa = cpu_isa()
    sources = [os.path.relpath(p, HERE) for p in
               sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) +
                      glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))]
    # at::parallel_for is header code: without OpenMP here it silently runs on one thread.
    # (-fopenmp links libgomp.so.1, the same soname as the libgomp torch ships and loads first.)
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and platform.system() == "Linux" else []
    cxx_flags = ["-O3", f'-DATER_EXT_CPU_ISA="{isa}"'] + CPU_ISA_FLAGS[isa] + openmp
    kwargs = dict(name="ater_ext._C", include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=openmp)
    if with_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))]
        # No --use_fast_math: the kernels must round exactly like the reference.
        nvcc_flags = ["-O3", "-lineinfo"]
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)


setup(
    packages=find_packages(include=["ater_ext", "ater_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
