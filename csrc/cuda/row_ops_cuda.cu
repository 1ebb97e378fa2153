// CUDA entry points of the ater_ext row ops (schema in csrc/ater_ext.cpp):
// argument checks (csrc/checks.h), device guard, contiguous inputs, then the
// kernels of csrc/cuda/row_kernels.cuh for the dtype and the CUDA layout
// chosen (csrc/cuda_layout.h). The kernels of each (dtype, layout) pair are
// compiled in their own translation unit, row_ops_cuda_<layout>_<dtype>.cu.
#include "row_kernels.cuh"

namespace ater_ext {
namespace cuda_impl {
ATER_EXT_CUDA_DECLARE(float, false)
ATER_EXT_CUDA_DECLARE(float, true)
ATER_EXT_CUDA_DECLARE(double, false)
ATER_EXT_CUDA_DECLARE(double, true)
ATER_EXT_CUDA_DECLARE(at::Half, false)
ATER_EXT_CUDA_DECLARE(at::Half, true)
ATER_EXT_CUDA_DECLARE(at::BFloat16, false)
ATER_EXT_CUDA_DECLARE(at::BFloat16, true)
ATER_EXT_CUDA_SPHERE_STEP(extern, float)
ATER_EXT_CUDA_SPHERE_STEP(extern, double)
ATER_EXT_CUDA_SPHERE_STEP(extern, at::Half)
ATER_EXT_CUDA_SPHERE_STEP(extern, at::BFloat16)
}  // namespace cuda_impl

namespace {
using namespace cuda_impl;

// The entry points of one (dtype, layout) pair.
template <typename scalar_t, bool kAdaptive>
struct Launch {
  template <typename... Args>
  void steps(Args&&... args) const { launch_steps<scalar_t, kAdaptive>(std::forward<Args>(args)...); }
  template <typename... Args>
  void row_norm(Args&&... args) const { launch_row_norm<scalar_t, kAdaptive>(std::forward<Args>(args)...); }
  template <typename... Args>
  void row_norm_backward(Args&&... args) const {
    launch_row_norm_backward<scalar_t, kAdaptive>(std::forward<Args>(args)...);
  }
};

// f(Launch<scalar_t, layout>{}) for the dtype and the current CUDA layout.
template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  const bool adaptive = cuda_layout() == CudaLayout::kAdaptive;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ater_ext_cuda", [&] {
    if (adaptive) {
      f(Launch<scalar_t, true>{});
    } else {
      f(Launch<scalar_t, false>{});
    }
  });
}

// x, g: [B, ...]   out: contiguous, x's shape (may be x itself)
void normalized_step_out_cuda(const at::Tensor& x, const at::Tensor& g, double scale,
                              at::Tensor& out) {
  check_normalized_step("normalized_step", x, g);
  check_positive("normalized_step", "scale", scale);
  check_out("normalized_step", out, x, {x, g});
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = g.contiguous();
  const int64_t B = num_rows(xc);
  const int64_t D = row_size(xc);
  if (B == 0 || D == 0) return;
  dispatch(xc.scalar_type(), [&](auto launch) {
    launch.steps(xc, gc, at::Tensor(), out, out, 1, scale, scale, B, D);
  });
}

at::Tensor normalized_step_cuda(const at::Tensor& x, const at::Tensor& g, double scale) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  normalized_step_out_cuda(x, g, scale, out);
  return out;
}

// x, g: [B, ...]   out_a, out_b: x's shape
std::tuple<at::Tensor, at::Tensor> dual_normalized_step_cuda(const at::Tensor& x,
                                                             const at::Tensor& g,
                                                             double scale_a,
                                                             double scale_b) {
  check_normalized_step("dual_normalized_step", x, g);
  check_positive("dual_normalized_step", "scale_a", scale_a);
  check_positive("dual_normalized_step", "scale_b", scale_b);
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = g.contiguous();
  at::Tensor out_a = at::empty(xc.sizes(), xc.options());
  at::Tensor out_b = at::empty(xc.sizes(), xc.options());
  const int64_t B = num_rows(xc);
  const int64_t D = row_size(xc);
  if (B == 0 || D == 0) return {out_a, out_b};
  dispatch(xc.scalar_type(), [&](auto launch) {
    launch.steps(xc, gc, at::Tensor(), out_a, out_b, 2, scale_a, scale_b, B, D);
  });
  return {out_a, out_b};
}

// x, g0, g1: [B, ...]   out: contiguous, x's shape (may be x itself)
void fd_direction_out_cuda(const at::Tensor& x, const at::Tensor& g0, const at::Tensor& g1,
                           double eps, at::Tensor& out) {
  check_fd_direction(x, g0, g1, eps);
  check_out("fd_direction", out, x, {x, g0, g1});
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  const at::Tensor xc = x.contiguous();
  const at::Tensor g0c = g0.contiguous();
  const at::Tensor g1c = g1.contiguous();
  const int64_t B = num_rows(xc);
  const int64_t D = row_size(xc);
  if (B == 0 || D == 0) return;
  dispatch(xc.scalar_type(), [&](auto launch) {
    launch.steps(xc, g0c, g1c, out, out, 1, eps, eps, B, D);
  });
}

at::Tensor fd_direction_cuda(const at::Tensor& x, const at::Tensor& g0,
                             const at::Tensor& g1, double eps) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  fd_direction_out_cuda(x, g0, g1, eps, out);
  return out;
}

// x, z, g0, g1: [B, ...]   out: contiguous, x's shape
at::Tensor fd_sphere_step_cuda(const at::Tensor& x, const at::Tensor& z, const at::Tensor& g0,
                               const at::Tensor& g1, double step, double eps) {
  check_fd_sphere_step(x, z, g0, g1, step, eps);
  const at::cuda::OptionalCUDAGuard guard(device_of(x));
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t B = num_rows(x);
  const int64_t D = row_size(x);
  if (B == 0 || D == 0) return out;
  const at::Tensor xc = x.contiguous(), zc = z.contiguous(), g0c = g0.contiguous(), g1c = g1.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "fd_sphere_step_cuda", [&] {
    launch_fd_sphere_step<scalar_t>(xc, zc, g0c, g1c, out, step, eps, B, D);
  });
  return out;
}

// g: [B, ...]   out: [B]
at::Tensor row_norm_cuda(const at::Tensor& g) {
  check_rows_tensor("row_norm", "g", g);
  const at::cuda::OptionalCUDAGuard guard(device_of(g));
  const int64_t B = num_rows(g);
  const int64_t D = row_size(g);
  if (B == 0 || D == 0) return at::zeros({B}, g.options());
  const at::Tensor gc = g.contiguous();
  at::Tensor out = at::empty({B}, gc.options());
  dispatch(gc.scalar_type(), [&](auto launch) { launch.row_norm(gc, out, B, D); });
  return out;
}

// grad: [B]   g: [B, ...]   norm: [B]   out: g's shape
at::Tensor row_norm_backward_cuda(const at::Tensor& grad, const at::Tensor& g,
                                  const at::Tensor& norm) {
  check_row_norm_backward(grad, g, norm);
  const at::cuda::OptionalCUDAGuard guard(device_of(g));
  const at::Tensor gc = g.contiguous();
  at::Tensor out = at::empty(gc.sizes(), gc.options());
  const int64_t B = num_rows(gc);
  const int64_t D = row_size(gc);
  if (B == 0 || D == 0) return out;
  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor norm_c = norm.contiguous();
  dispatch(gc.scalar_type(), [&](auto launch) {
    launch.row_norm_backward(grad_c, gc, norm_c, out, B, D);
  });
  return out;
}

}  // namespace
}  // namespace ater_ext

TORCH_LIBRARY_IMPL(ater_ext, CUDA, m) {
  m.impl("normalized_step", &ater_ext::normalized_step_cuda);
  m.impl("normalized_step.out", &ater_ext::normalized_step_out_cuda);
  m.impl("dual_normalized_step", &ater_ext::dual_normalized_step_cuda);
  m.impl("fd_direction", &ater_ext::fd_direction_cuda);
  m.impl("fd_direction.out", &ater_ext::fd_direction_out_cuda);
  m.impl("fd_sphere_step", &ater_ext::fd_sphere_step_cuda);
  m.impl("row_norm", &ater_ext::row_norm_cuda);
  m.impl("row_norm_backward", &ater_ext::row_norm_backward_cuda);
}
