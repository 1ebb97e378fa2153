// Meta kernels of the ater_ext ops (schema in csrc/ater_ext.cpp): shapes,
// dtypes and devices of the outputs, after the same argument checks as the
// CPU and CUDA kernels (csrc/checks.h), so that meta tensors, and the fake
// tensors torch.compile traces with (FakeTensorMode runs an op's Meta kernel),
// refuse exactly what the real kernels refuse: unsupported dtypes, NaN / inf /
// non-positive scales, mismatched shapes, dtypes or devices (a CPU tensor
// mixed with a meta one dispatches here and is refused by the device check,
// instead of returning uninitialised CPU memory), bad out= buffers.
//
// Shapes are SymInts throughout, so the kernels also serve
// torch.compile(dynamic=True).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"

namespace ater_ext {
namespace {

// A contiguous tensor of x's (symbolic) shape, dtype and device.
at::Tensor empty_like_rows(const at::Tensor& x) {
  return at::empty_symint(x.sym_sizes(), x.options(), at::MemoryFormat::Contiguous);
}

void normalized_step_out_meta(const at::Tensor& x, const at::Tensor& g, double scale,
                              at::Tensor& out) {
  check_normalized_step("normalized_step", x, g);
  check_positive("normalized_step", "scale", scale);
  check_out("normalized_step", out, x, {x, g});
}

at::Tensor normalized_step_meta(const at::Tensor& x, const at::Tensor& g, double scale) {
  check_normalized_step("normalized_step", x, g);
  check_positive("normalized_step", "scale", scale);
  return empty_like_rows(x);
}

std::tuple<at::Tensor, at::Tensor> dual_normalized_step_meta(const at::Tensor& x,
                                                             const at::Tensor& g,
                                                             double scale_a, double scale_b) {
  check_normalized_step("dual_normalized_step", x, g);
  check_positive("dual_normalized_step", "scale_a", scale_a);
  check_positive("dual_normalized_step", "scale_b", scale_b);
  return {empty_like_rows(x), empty_like_rows(x)};
}

void fd_direction_out_meta(const at::Tensor& x, const at::Tensor& g0, const at::Tensor& g1,
                           double eps, at::Tensor& out) {
  check_fd_direction(x, g0, g1, eps);
  check_out("fd_direction", out, x, {x, g0, g1});
}

at::Tensor fd_direction_meta(const at::Tensor& x, const at::Tensor& g0, const at::Tensor& g1,
                             double eps) {
  check_fd_direction(x, g0, g1, eps);
  return empty_like_rows(x);
}

at::Tensor fd_sphere_step_meta(const at::Tensor& x, const at::Tensor& z, const at::Tensor& g0,
                               const at::Tensor& g1, double step, double eps) {
  check_fd_sphere_step(x, z, g0, g1, step, eps);
  return empty_like_rows(x);
}

at::Tensor row_norm_meta(const at::Tensor& g) {
  check_rows_tensor("row_norm", "g", g);
  return at::empty_symint({g.sym_size(0)}, g.options());
}

at::Tensor row_norm_backward_meta(const at::Tensor& grad, const at::Tensor& g,
                                  const at::Tensor& norm) {
  check_row_norm_backward(grad, g, norm);
  return empty_like_rows(g);
}

}  // namespace

TORCH_LIBRARY_IMPL(ater_ext, Meta, m) {
  m.impl("normalized_step", &normalized_step_meta);
  m.impl("normalized_step.out", &normalized_step_out_meta);
  m.impl("dual_normalized_step", &dual_normalized_step_meta);
  m.impl("fd_direction", &fd_direction_meta);
  m.impl("fd_direction.out", &fd_direction_out_meta);
  m.impl("fd_sphere_step", &fd_sphere_step_meta);
  m.impl("row_norm", &row_norm_meta);
  m.impl("row_norm_backward", &row_norm_backward_meta);
}

}  // namespace ater_ext
