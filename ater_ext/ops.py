"""Typed wrappers of the fused ops ``torch.ops.ater_ext.*``, with their autograd
formulas (as autograd.Functions that torch.func can lift), vmap rules and the
switch between the CUDA kernel layouts. Meta / fake kernels are C++.

Rows are the leading dimension and every trailing dimension belongs to the row:
a ``[B, C, H, W]`` batch is normalised per sample over ``C*H*W`` values. Norms
accumulate in fp32 (fp64 for fp64 inputs) and are scale-safe; a zero row
normalises to zero, so ``normalized_step`` and ``fd_direction`` leave that
row of ``x`` unchanged instead of producing NaN.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import _loader  # registers torch.ops.ater_ext

__all__ = ["normalized_step", "dual_normalized_step", "fd_direction", "fd_sphere_step", "row_norm", "CUDA_LAYOUTS",
           "get_cuda_layout", "set_cuda_layout", "cuda_layout", "FUNCTIONS"]

_ops = torch.ops.ater_ext


def _functorch_active() -> bool:
    """A torch.func transform (grad, vjp, jacrev, vmap, ...) is running (never while dynamo traces)."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _call(name: str, *args):
    """The op ``name``; under torch.func transforms through its autograd.Function, which
    functorch lifts (it cannot lift one applied from inside the dispatcher)."""
    if _functorch_active():
        return FUNCTIONS[name].apply(*args)
    return getattr(_ops, name)(*args)


def normalized_step(x: Tensor, g: Tensor, scale: float, *, out: Optional[Tensor] = None) -> Tensor:
    """``x + scale * g / ||g||`` per row.

    Args:
        x: ``[B, ...]`` points to move.
        g: ``[B, ...]`` directions (same shape, dtype and device as ``x``).
        scale: step length, finite and > 0.
        out: optional contiguous buffer of ``x``'s shape, dtype and device to
            write into (may be ``x`` itself). As PyTorch's own ``out=``
            functions: not differentiable, so refused (RuntimeError) while grad
            mode is on and ``x``, ``g`` or ``out`` requires grad; ``out``'s
            version counter is bumped, so autograd raises if a graph saved it.

    Gradients flow to ``x`` as the identity; ``g`` is treated as a constant
    (as the adversarial perturbation is in the paper), so none reaches it.
    """
    if out is not None:
        _ops.normalized_step.out(x, g, float(scale), out=out)
        return out
    return _call("normalized_step", x, g, float(scale))


def dual_normalized_step(x: Tensor, g: Tensor, scale_a: float, scale_b: float) -> Tuple[Tensor, Tensor]:
    """``(x + scale_a * u, x + scale_b * u)`` with ``u = g / ||g||``, from one read of ``g``.

    ATER takes the adversarial point ``x_adv`` (``scale_a = eps_adv``) and the
    finite-difference probe (``scale_b = xi``) from the same pass-1 gradient;
    this computes both in one launch. Gradients as in :func:`normalized_step`.
    """
    return _call("dual_normalized_step", x, g, float(scale_a), float(scale_b))


def fd_direction(x: Tensor, g0: Tensor, g1: Tensor, eps: float, *, out: Optional[Tensor] = None) -> Tensor:
    """``x + eps * (g1 - g0) / ||g1 - g0||`` per row: the paper's Eq. 15.

    With ``g0 = grad_x L(x)`` and ``g1 = grad_x L(x + xi * g0 / ||g0||)``, the
    normalised difference approximates ``H g0 / ||H g0||`` (the direction in
    which the input-gradient norm grows fastest) only when no ReLU / max-pool
    kink or tie lies within ``xi`` of ``x``: true at initialisation, while on
    trained ReLU models the two can be unrelated (see
    ``benchmarks/results/xmax-*.md``); ``xi`` cancels in the normalisation. The difference is taken in fp32 (fp64 for fp64 inputs).
    Gradients flow to ``x`` only. ``out`` as in :func:`normalized_step`.
    """
    if out is not None:
        _ops.fd_direction.out(x, g0, g1, float(eps), out=out)
        return out
    return _call("fd_direction", x, g0, g1, float(eps))


def fd_sphere_step(x: Tensor, z: Tensor, g0: Tensor, g1: Tensor, step: float, eps: float) -> Tensor:
    """``x + eps * normalize(z + step * normalize(g1 - g0) - x)`` per row, in one launch.

    One finite-difference step of the projected ascent of ``||grad_x L||`` on the
    sphere of ``B(x, eps)`` (``x_max(..., steps=k)``): from the current point ``z``,
    with ``g0 = grad_x L(z)`` and ``g1 = grad_x L(z + xi * g0 / ||g0||)``, move
    ``step`` along the normalised difference and pull the result back onto the
    sphere around ``x``. The same as
    ``normalized_step(x, fd_direction(z, g0, g1, step) - x, eps)`` up to rounding,
    without the intermediate tensors and launches. Both differences are taken
    in fp32 (fp64 for fp64 inputs). Zero rows as the other ops: ``g1 == g0``
    leaves ``z`` unmoved before the projection; a moved point equal to ``x``
    gives ``x``.

    Args:
        x: ``[B, ...]`` centres of the balls.
        z: ``[B, ...]`` current points (typically on the sphere).
        g0, g1: ``[B, ...]`` input gradients at ``z`` and at the probe.
        step: length of the move along the difference, finite and > 0.
        eps: radius of the sphere, finite and > 0.

    All tensors share shape, dtype and device. Differentiable (also twice) in
    every tensor with the true derivative of the formula (unlike the other
    steps, whose perturbation is a constant: here the projection depends on
    ``x`` and ``z``); at a zero row the normalisation contributes nothing.
    """
    return _call("fd_sphere_step", x, z, g0, g1, float(step), float(eps))


def row_norm(g: Tensor) -> Tensor:
    """``[B]`` per-row L2 norms of a ``[B, ...]`` tensor, in ``g``'s dtype.

    Differentiable (also twice); the gradient of a zero row is zero. Works
    under ``torch.func`` (``grad``, ``vjp``, ``jacrev``, ``vmap``), as the
    other typed wrappers do; a row holding +-inf has norm inf, one holding NaN NaN.
    """
    return _call("row_norm", g)


# ------------------------------------------------------------ CUDA layouts
CUDA_LAYOUTS = ("rows", "adaptive")


def get_cuda_layout() -> str:
    """The CUDA kernel structure the ops launch: ``"rows"`` (the default) or ``"adaptive"``."""
    return _loader._C.cuda_layout()


def set_cuda_layout(layout: str) -> str:
    """Choose the CUDA kernel structure; returns the previous one. Process-wide.

    ``"rows"`` (default): one warp (D <= 1024) or one block per row, 16-byte
    vectors only when every pointer is aligned and D is a multiple of the
    vector width. ``"adaptive"``: each row walked as an aligned head, a vector
    body and a scalar tail (any D, views at any offset, as long as all tensors
    of a call share their address residue mod 16); several rows per warp for
    tiny rows; rows split over several blocks (a fixed-order second pass
    keeps results deterministic) when the batch is small against the SM
    count. Both give the same values up to the summation order. The CPU
    kernels ignore it; ``ATER_EXT_CUDA_LAYOUT`` sets it at import. A CUDA
    graph keeps the layout it was captured with.
    """
    if layout not in CUDA_LAYOUTS:
        raise ValueError(f"ater_ext.ops.set_cuda_layout: layout must be one of {list(CUDA_LAYOUTS)}, got {layout!r}")
    previous = get_cuda_layout()
    _loader._C.set_cuda_layout(layout)
    return previous


@contextlib.contextmanager
def cuda_layout(layout: str) -> Iterator[None]:
    """``with ops.cuda_layout("adaptive"): ...``: :func:`set_cuda_layout` for a block, restored after."""
    previous = set_cuda_layout(layout)
    try:
        yield
    finally:
        set_cuda_layout(previous)


# ------------------------------------------------------- meta / fake kernels
# The Meta kernels are C++ (csrc/row_ops_meta.cpp): they run the real kernels'
# argument checks (csrc/checks.h) before giving the output shapes, and
# torch.compile's fake tensors run them too. The .out overloads also have C++
# Autograd and ADInplaceOrView kernels (csrc/out_autograd.cpp): out= is refused
# when autograd would need it, and out's version counter is bumped, as for
# PyTorch's own out= functions.


# -------------------------------------------------------------------- autograd
# The steps: d out / d x = I; the perturbation is a constant.
def _step_backward(ctx, grad):
    return grad, None, None


def _dual_step_backward(ctx, grad_a, grad_b):
    if grad_a is None:
        grad_x = grad_b
    elif grad_b is None:
        grad_x = grad_a
    else:
        grad_x = grad_a + grad_b
    return grad_x, None, None, None


def _fd_direction_backward(ctx, grad):
    return grad, None, None, None


def _fd_sphere_step_setup(ctx, inputs, output):
    x, z, g0, g1, step, eps = inputs
    ctx.save_for_backward(x, z, g0, g1)
    ctx.step, ctx.eps = step, eps


def _project_out(v: Tensor, unit: Tensor) -> Tensor:
    """``v - unit <unit, v>`` per row ([B, D])."""
    return v - unit * (unit * v).sum(dim=1, keepdim=True)


def _unit_and_inverse_norm(v: Tensor) -> Tuple[Tensor, Tensor]:
    """``(v / ||v||, 1 / ||v||)`` per row of a [B, D] tensor, both 0 at a zero row."""
    n = row_norm(v)[:, None]
    inv = torch.where(n > 0, 1.0 / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))
    return v * inv, inv


def _fd_sphere_step_backward(ctx, grad):
    """The vector-Jacobian product of ``x + eps * m / ||m||`` with
    ``m = z + step * d / ||d|| - x`` and ``d = g1 - g0``, in plain differentiable
    ops (in fp32, fp64 for fp64 inputs)."""
    x, z, g0, g1 = ctx.saved_tensors
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32

    def rows(t):
        return t.reshape(t.shape[0], -1).to(acc)

    d_unit, d_inv = _unit_and_inverse_norm(rows(g1) - rows(g0))
    m_unit, m_inv = _unit_and_inverse_norm(rows(z) + ctx.step * d_unit - rows(x))
    w = rows(grad)
    grad_m = _project_out(w, m_unit) * (ctx.eps * m_inv)
    grad_d = _project_out(grad_m, d_unit) * (ctx.step * d_inv)

    def back(v, like):
        return v.to(like.dtype).reshape(like.shape)

    return back(w - grad_m, x), back(grad_m, z), back(-grad_d, g0), back(grad_d, g1), None, None


def _row_norm_setup(ctx, inputs, output):
    (g,) = inputs
    ctx.save_for_backward(g, output)


def _row_norm_backward(ctx, grad):
    g, norm = ctx.saved_tensors
    return _call("row_norm_backward", grad, g, norm)


def _row_norm_backward_setup(ctx, inputs, output):
    grad, g, norm = inputs
    ctx.save_for_backward(grad, g, norm)


def _row_norm_double_backward(ctx, upstream):
    """Gradient of ``out = grad[b] * g[b] / norm[b]`` (0 where norm == 0) with
    respect to (grad, g, norm), in plain differentiable torch ops."""
    grad, g, norm = ctx.saved_tensors
    rows = g.reshape(g.shape[0], -1)
    up = upstream.reshape(rows.shape)
    nonzero = norm != 0
    safe_norm = torch.where(nonzero, norm, torch.ones_like(norm))
    up_dot_g = (up * rows).sum(dim=1)
    d_grad = torch.where(nonzero, up_dot_g / safe_norm, torch.zeros_like(norm))
    d_g = torch.where(nonzero, grad / safe_norm, torch.zeros_like(norm))[:, None] * up
    d_norm = torch.where(nonzero, -grad * up_dot_g / safe_norm.square(), torch.zeros_like(norm))
    return d_grad, d_g.reshape(g.shape), d_norm


# Each differentiable op has an autograd.Function with setup_context, whose
# forward runs the op below autograd and whose vmap rule functorch generates
# from the op's own (see the vmap section). The op's Autograd kernel applies
# it for plain autograd; under torch.func transforms the typed wrappers apply
# it from Python (_call), because functorch lifts an autograd.Function only
# when it is applied outside the dispatcher (and the Function that
# torch.library.register_autograd generates has no setup_context at all,
# which is why torch.func.grad over row_norm used to fail).
def _no_setup(ctx, inputs, output):
    pass


def _make_function(op_name: str, backward, setup_context):
    op = getattr(_ops, op_name).default

    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return type(f"AterExt_{op_name}", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "generate_vmap_rule": True,
    })


def _autograd_kernel(op_name: str, function):
    op = getattr(_ops, op_name).default

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            if _functorch_active():
                raise RuntimeError(f"ater_ext::{op_name}: under torch.func transforms (grad, vjp, jacrev, ...) call the "
                                   f"typed wrappers of ater_ext.ops (ater_ext.ops.row_norm, ...), not "
                                   f"torch.ops.ater_ext.{op_name}: functorch cannot lift an autograd.Function "
                                   f"applied from inside the dispatcher")
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


_AUTOGRAD = {
    "normalized_step": (_step_backward, _no_setup),
    "dual_normalized_step": (_dual_step_backward, _no_setup),
    "fd_direction": (_fd_direction_backward, _no_setup),
    "fd_sphere_step": (_fd_sphere_step_backward, _fd_sphere_step_setup),
    "row_norm": (_row_norm_backward, _row_norm_setup),
    "row_norm_backward": (_row_norm_double_backward, _row_norm_backward_setup),
}
_lib = torch.library.Library("ater_ext", "IMPL")  # noqa: TOR901 (kept for the registrations' lifetime)
FUNCTIONS = {}  # op name -> the autograd.Function its Autograd kernel applies
for _name, (_backward, _setup) in _AUTOGRAD.items():
    FUNCTIONS[_name] = _make_function(_name, _backward, _setup)
    _lib.impl(_name, _autograd_kernel(_name, FUNCTIONS[_name]), "Autograd", with_keyset=True)
del _name, _backward, _setup


# ------------------------------------------------------------------------ vmap
# Every op works on independent rows (dim 0), so a vmapped call is one call on
# the vmapped and the per-example row dimensions flattened together:
# [N, B, ...] -> [N * B, ...], outputs reshaped back to [N, B, ...]. Inputs
# not vmapped over are expanded to N first. torch.func.jacrev (vmap of vjp) and
# vmap of grad run through these.
def _flatten_vmapped(info, in_dims, args):
    """(args with every tensor as [N * B, ...], per-example row count B), or
    (None, i) when tensor argument i has 0-d examples (the op's own check then refuses it)."""
    n = info.batch_size
    flat, rows = [], None
    for i, (a, d) in enumerate(zip(args, in_dims)):
        if not isinstance(a, Tensor):
            flat.append(a)
            continue
        a = a.movedim(d, 0) if d is not None else a.expand(n, *a.shape)
        if a.dim() < 2:
            return None, i
        rows = a.shape[1] if rows is None else rows
        flat.append(a.reshape(n * a.shape[1], *a.shape[2:]))
    return flat, rows


def _vmap_rule(op):
    def rule(info, in_dims, *args):
        flat, rows = _flatten_vmapped(info, in_dims, args)
        if flat is None:  # a 0-d example: let the op refuse it with its own message
            bad = rows
            example = [a.select(d, 0) if isinstance(a, Tensor) and d is not None else a for a, d in zip(args, in_dims)]
            op(*example)
            raise AssertionError(f"{op}: argument {bad} has 0-d examples, which the op must refuse")  # pragma: no cover
        out = op(*flat)
        n = info.batch_size
        if isinstance(out, tuple):
            return tuple(o.reshape(n, rows, *o.shape[1:]) for o in out), tuple(0 for _ in out)
        return out.reshape(n, rows, *out.shape[1:]), 0

    return rule


for _name in _AUTOGRAD:
    torch.library.register_vmap(f"ater_ext::{_name}", _vmap_rule(getattr(_ops, _name).default))
del _name
