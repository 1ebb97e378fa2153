// Argument checks shared by every backend, the Meta one included (csrc/row_ops_meta.cpp,
// which torch.compile's fake tensors run): so meta / fake calls refuse exactly what
// the real kernels refuse. Each message names the op and shows the shapes / dtypes /
// devices it saw, e.g.
//   "ater_ext::fd_direction: g0 and g1 must have the same shape, got g0 [4, 3] and g1 [4, 5]"
// Shapes are read as SymInts (sym_sizes), so the checks also run on tensors with
// symbolic shapes (torch.compile(dynamic=True)), where they become guards.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace ater_ext {

// Row count B (dim 0) and row length D (product of the trailing dims).
inline int64_t num_rows(const at::Tensor& t) { return t.size(0); }
inline int64_t row_size(const at::Tensor& t) {
  int64_t d = 1;
  for (int64_t i = 1; i < t.dim(); ++i) d *= t.size(i);
  return d;
}

inline bool is_supported_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf ||
         s == at::kBFloat16;
}

// A [B, ...] tensor of a supported floating dtype.
inline void check_rows_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "ater_ext::", op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() >= 1, "ater_ext::", op, ": ", name,
              " must have a leading batch dimension, got a 0-d tensor (shape ",
              t.sym_sizes(), ")");
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), "ater_ext::", op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type(), " with shape ", t.sym_sizes());
}

// b has exactly a's shape, dtype and device.
inline void check_like(const char* op, const char* a_name, const at::Tensor& a,
                       const char* b_name, const at::Tensor& b) {
  TORCH_CHECK(a.sym_sizes() == b.sym_sizes(), "ater_ext::", op, ": ", a_name, " and ", b_name,
              " must have the same shape, got ", a_name, " ", a.sym_sizes(), " and ",
              b_name, " ", b.sym_sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "ater_ext::", op, ": ", a_name,
              " and ", b_name, " must have the same dtype, got ", a_name, " ",
              a.scalar_type(), " ", a.sym_sizes(), " and ", b_name, " ", b.scalar_type(),
              " ", b.sym_sizes());
  TORCH_CHECK(a.device() == b.device(), "ater_ext::", op, ": ", a_name, " and ",
              b_name, " must be on the same device, got ", a_name, " on ", a.device(),
              " and ", b_name, " on ", b.device());
}

inline void check_positive(const char* op, const char* name, double v) {
  TORCH_CHECK(std::isfinite(v) && v > 0, "ater_ext::", op, ": ", name,
              " must be finite and > 0, got ", v);
}

inline void check_normalized_step(const char* op, const at::Tensor& x,
                                  const at::Tensor& g) {
  check_rows_tensor(op, "x", x);
  check_rows_tensor(op, "g", g);
  check_like(op, "x", x, "g", g);
}

inline void check_fd_direction(const at::Tensor& x, const at::Tensor& g0,
                               const at::Tensor& g1, double eps) {
  const char* op = "fd_direction";
  check_rows_tensor(op, "x", x);
  check_rows_tensor(op, "g0", g0);
  check_rows_tensor(op, "g1", g1);
  check_like(op, "x", x, "g0", g0);
  check_like(op, "g0", g0, "g1", g1);
  check_positive(op, "eps", eps);
}

inline void check_fd_sphere_step(const at::Tensor& x, const at::Tensor& z, const at::Tensor& g0,
                                 const at::Tensor& g1, double step, double eps) {
  const char* op = "fd_sphere_step";
  check_rows_tensor(op, "x", x);
  check_rows_tensor(op, "z", z);
  check_rows_tensor(op, "g0", g0);
  check_rows_tensor(op, "g1", g1);
  check_like(op, "x", x, "z", z);
  check_like(op, "x", x, "g0", g0);
  check_like(op, "g0", g0, "g1", g1);
  check_positive(op, "step", step);
  check_positive(op, "eps", eps);
}

inline void check_row_norm_backward(const at::Tensor& grad, const at::Tensor& g,
                                    const at::Tensor& norm) {
  const char* op = "row_norm_backward";
  check_rows_tensor(op, "g", g);
  check_rows_tensor(op, "grad", grad);
  check_rows_tensor(op, "norm", norm);
  const c10::SymInt rows = g.sym_size(0);
  TORCH_CHECK(grad.dim() == 1 && grad.sym_size(0) == rows && norm.dim() == 1 &&
                  norm.sym_size(0) == rows,
              "ater_ext::", op, ": grad and norm must have shape [", rows,
              "] (one value per row of g ", g.sym_sizes(), "), got grad ", grad.sym_sizes(),
              " and norm ", norm.sym_sizes());
  TORCH_CHECK(grad.scalar_type() == g.scalar_type() && norm.scalar_type() == g.scalar_type(),
              "ater_ext::", op, ": grad, g and norm must have the same dtype, got ",
              grad.scalar_type(), ", ", g.scalar_type(), " and ", norm.scalar_type());
  TORCH_CHECK(grad.device() == g.device() && norm.device() == g.device(), "ater_ext::",
              op, ": grad, g and norm must be on the same device, got ", grad.device(),
              ", ", g.device(), " and ", norm.device());
}

inline bool has_symbolic_shape(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// An .out buffer: x's shape, dtype and device, contiguous, and either x itself
// or not overlapping any input (the kernels read each element before writing
// it at the same index, so out == x or out == g is safe; a shifted overlap is not).
// The overlap tests read element counts and storage addresses, which tensors with
// symbolic shapes (torch.compile(dynamic=True) tracing) do not have: there they
// are left to the real kernel that runs the compiled graph.
inline void check_out(const char* op, const at::Tensor& out, const at::Tensor& x,
                      std::initializer_list<at::Tensor> inputs) {
  check_like(op, "x", x, "out", out);
  TORCH_CHECK(out.is_contiguous(), "ater_ext::", op, ": out must be contiguous, got strides ",
              out.sym_strides(), " for shape ", out.sym_sizes());
  if (has_symbolic_shape(out)) return;
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, "ater_ext::", op,
              ": out has internally overlapping memory (shape ", out.sizes(), ", strides ",
              out.strides(), ")");
  for (const auto& t : inputs) {
    if (has_symbolic_shape(t)) continue;
    TORCH_CHECK(at::get_overlap_status(out, t) != at::MemOverlapStatus::Partial, "ater_ext::",
                op, ": out ", out.sizes(), " partially overlaps an input ", t.sizes(),
                "; pass the input itself or a separate buffer");
  }
}

}  // namespace ater_ext
