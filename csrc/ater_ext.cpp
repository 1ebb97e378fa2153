// The op schema of ater_ext: one TORCH_LIBRARY, backends register kernels in
// csrc/cpu/ and csrc/cuda/ (TORCH_LIBRARY_IMPL), the dispatcher picks one.
// Meta kernels (which fake tensors run too) are in csrc/row_ops_meta.cpp, the
// .out overloads' Autograd / ADInplaceOrView kernels in csrc/out_autograd.cpp;
// the other ops' autograd formulas and vmap rules are registered from Python
// (ater_ext/ops.py), next to the typed wrappers.
//
// The .out overloads write into a caller's buffer and return nothing (so that
// functionalization / torch.compile can handle them) (contiguous, x's shape,
// dtype and device; it may be x itself), so a training loop can reuse memory.
//
// All ops treat dim 0 as the row (sample) dimension and flatten the rest:
// x, g, g0, g1: [B, ...]  ->  viewed as [B, D] with D = numel / B.
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>

#include "cuda_layout.h"

#ifndef ATER_EXT_CPU_ISA
#define ATER_EXT_CPU_ISA "default"
#endif

namespace ater_ext {
namespace {
std::atomic<int> g_cuda_layout{static_cast<int>(CudaLayout::kRows)};
}  // namespace
CudaLayout cuda_layout() { return static_cast<CudaLayout>(g_cuda_layout.load(std::memory_order_relaxed)); }
void set_cuda_layout(CudaLayout layout) { g_cuda_layout.store(static_cast<int>(layout), std::memory_order_relaxed); }
}  // namespace ater_ext

namespace {
constexpr const char* kLayoutNames[] = {"rows", "adaptive"};

// cuda_layout() -> "rows" | "adaptive"
PyObject* get_layout(PyObject*, PyObject*) {
  return PyUnicode_FromString(kLayoutNames[static_cast<int>(ater_ext::cuda_layout())]);
}

// set_cuda_layout(name): ValueError naming the choices for anything else.
PyObject* set_layout(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  for (int i = 0; name != nullptr && i < 2; ++i) {
    if (std::strcmp(name, kLayoutNames[i]) == 0) {
      ater_ext::set_cuda_layout(static_cast<ater_ext::CudaLayout>(i));
      Py_RETURN_NONE;
    }
  }
  PyErr_Format(PyExc_ValueError, "ater_ext: the CUDA kernel layout must be 'rows' or 'adaptive', got %R", arg);
  return nullptr;
}

// The SIMD instruction set the CPU kernels were compiled for (setup.py), so
// that importing the package on a CPU without it fails with a clear message.
PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(ATER_EXT_CPU_ISA); }

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "SIMD ISA the CPU kernels were built for."},
    {"cuda_layout", get_layout, METH_NOARGS, "The CUDA kernel layout the ops launch."},
    {"set_cuda_layout", set_layout, METH_O, "Choose the CUDA kernel layout ('rows' or 'adaptive')."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// Importing ater_ext._C loads this shared library, which runs the static
// op registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "ater_ext op registrations", -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ater_ext, m) {
  // x + scale * normalize(g)
  m.def("normalized_step(Tensor x, Tensor g, float scale) -> Tensor");
  m.def(
      "normalized_step.out(Tensor x, Tensor g, float scale, *, Tensor(a!) out) -> ()");
  // (x + scale_a * normalize(g), x + scale_b * normalize(g)) from one read of g
  m.def(
      "dual_normalized_step(Tensor x, Tensor g, float scale_a, float scale_b)"
      " -> (Tensor, Tensor)");
  // x + eps * normalize(g1 - g0)   (Eq. 15; xi cancels in the normalisation)
  m.def("fd_direction(Tensor x, Tensor g0, Tensor g1, float eps) -> Tensor");
  m.def(
      "fd_direction.out(Tensor x, Tensor g0, Tensor g1, float eps, *, Tensor(a!) out) -> ()");
  // One step of the FD ascent of ||grad_x L|| on the sphere of B(x, eps), from z:
  // x + eps * normalize(z + step * normalize(g1 - g0) - x)   (one launch)
  m.def(
      "fd_sphere_step(Tensor x, Tensor z, Tensor g0, Tensor g1, float step, float eps)"
      " -> Tensor");
  // [B] per-row L2 norms
  m.def("row_norm(Tensor g) -> Tensor");
  // grad[b] * g[b] / norm[b]; 0 where norm[b] == 0
  m.def("row_norm_backward(Tensor grad, Tensor g, Tensor norm) -> Tensor");
}
