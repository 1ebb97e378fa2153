// The op schema of ater_ext: one TORCH_LIBRARY, backends register kernels in
// csrc/cpu/ and csrc/cuda/ (TORCH_LIBRARY_IMPL), the dispatcher picks one.
// Fake (meta) kernels and autograd formulas are registered from Python
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

#ifndef ATER_EXT_CPU_ISA
#define ATER_EXT_CPU_ISA "default"
#endif

namespace {
// The SIMD instruction set the CPU kernels were compiled for (setup.py), so
// that importing the package on a CPU without it fails with a clear message.
PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(ATER_EXT_CPU_ISA); }

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "SIMD ISA the CPU kernels were built for."},
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
  // [B] per-row L2 norms
  m.def("row_norm(Tensor g) -> Tensor");
  // grad[b] * g[b] / norm[b]; 0 where norm[b] == 0
  m.def("row_norm_backward(Tensor grad, Tensor g, Tensor norm) -> Tensor");
}
