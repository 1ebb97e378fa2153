// Autograd and ADInplaceOrView kernels of the .out overloads
// (normalized_step.out, fd_direction.out), doing what PyTorch's generated
// kernels do for its own out= functions (torch.add(..., out=) etc.):
//
//   Autograd:        while grad mode is on, refuse when an input or out requires
//                    grad ("<op>(): functions with out=... arguments don't support
//                    automatic differentiation, but one of the arguments requires
//                    grad."), and refuse forward-mode AD; then run the op below
//                    autograd.
//   ADInplaceOrView: run the op below this key, then bump out's version counter,
//                    so a graph that saved out (or a view of its storage) raises
//                    "... modified by an inplace operation" at backward.
//
// Under torch.inference_mode() neither key is dispatched to (as for PyTorch's
// ops): inference tensors have no version counter.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <initializer_list>

namespace ater_ext {
namespace {

// What PyTorch's compute_requires_grad + throw_error_out_requires_grad do.
void refuse_if_autograd(const char* op, std::initializer_list<const at::Tensor*> inputs,
                        const at::Tensor& out) {
  bool forward_grad = out._fw_grad(/*level=*/0).defined();
  for (const at::Tensor* t : inputs) forward_grad = forward_grad || t->_fw_grad(0).defined();
  TORCH_CHECK_NOT_IMPLEMENTED(!forward_grad, "Trying to use forward AD with ater_ext::", op,
                              ".out that does not support it because it is an out= function");
  if (!at::GradMode::is_enabled()) return;
  bool requires_grad = out.requires_grad();
  for (const at::Tensor* t : inputs) requires_grad = requires_grad || t->requires_grad();
  TORCH_CHECK(!requires_grad, "ater_ext::", op,
              "(): functions with out=... arguments don't support automatic differentiation, "
              "but one of the arguments requires grad.");
}

using NormalizedStepOut = void(const at::Tensor&, const at::Tensor&, double, at::Tensor&);
using FdDirectionOut = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                            at::Tensor&);

const c10::TypedOperatorHandle<NormalizedStepOut>& normalized_step_out_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ater_ext::normalized_step", "out")
                             .typed<NormalizedStepOut>();
  return op;
}

const c10::TypedOperatorHandle<FdDirectionOut>& fd_direction_out_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ater_ext::fd_direction", "out")
                             .typed<FdDirectionOut>();
  return op;
}

void normalized_step_out_autograd(const at::Tensor& x, const at::Tensor& g, double scale,
                                  at::Tensor& out) {
  refuse_if_autograd("normalized_step", {&x, &g}, out);
  const at::AutoDispatchBelowAutograd guard;
  normalized_step_out_op().call(x, g, scale, out);
}

void normalized_step_out_inplace(const at::Tensor& x, const at::Tensor& g, double scale,
                                 at::Tensor& out) {
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    normalized_step_out_op().call(x, g, scale, out);
  }
  out.unsafeGetTensorImpl()->bump_version();
}

void fd_direction_out_autograd(const at::Tensor& x, const at::Tensor& g0, const at::Tensor& g1,
                               double eps, at::Tensor& out) {
  refuse_if_autograd("fd_direction", {&x, &g0, &g1}, out);
  const at::AutoDispatchBelowAutograd guard;
  fd_direction_out_op().call(x, g0, g1, eps, out);
}

void fd_direction_out_inplace(const at::Tensor& x, const at::Tensor& g0, const at::Tensor& g1,
                              double eps, at::Tensor& out) {
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    fd_direction_out_op().call(x, g0, g1, eps, out);
  }
  out.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(ater_ext, Autograd, m) {
  m.impl("normalized_step.out", &normalized_step_out_autograd);
  m.impl("fd_direction.out", &fd_direction_out_autograd);
}

TORCH_LIBRARY_IMPL(ater_ext, ADInplaceOrView, m) {
  m.impl("normalized_step.out", &normalized_step_out_inplace);
  m.impl("fd_direction.out", &fd_direction_out_inplace);
}

}  // namespace ater_ext
