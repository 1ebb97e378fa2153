"""Typed wrappers of the fused ops ``torch.ops.ater_ext.*``, with their fake
kernels (shape propagation for meta tensors and torch.compile) and autograd
formulas.

Rows are the leading dimension and every trailing dimension belongs to the row:
a ``[B, C, H, W]`` batch is normalised per sample over ``C*H*W`` values. Norms
accumulate in fp32 (fp64 for fp64 inputs) and are scale-safe; a zero row
normalises to zero, so ``normalized_step`` and ``fd_direction`` leave that
row of ``x`` unchanged instead of producing NaN.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _loader  # noqa: F401  (registers torch.ops.ater_ext)

__all__ = ["normalized_step", "dual_normalized_step", "fd_direction", "row_norm"]

_ops = torch.ops.ater_ext


def normalized_step(x: Tensor, g: Tensor, scale: float, *, out: Optional[Tensor] = None) -> Tensor:
    """``x + scale * g / ||g||`` per row.

    Args:
        x: ``[B, ...]`` points to move.
        g: ``[B, ...]`` directions (same shape, dtype and device as ``x``).
        scale: step length, finite and > 0.
        out: optional contiguous buffer of ``x``'s shape, dtype and device to
            write into (may be ``x`` itself); not differentiable.

    Gradients flow to ``x`` as the identity; ``g`` is treated as a constant
    (as the adversarial perturbation is in the paper), so none reaches it.
    """
    if out is not None:
        _ops.normalized_step.out(x, g, float(scale), out=out)
        return out
    return _ops.normalized_step(x, g, float(scale))


def dual_normalized_step(x: Tensor, g: Tensor, scale_a: float, scale_b: float) -> Tuple[Tensor, Tensor]:
    """``(x + scale_a * u, x + scale_b * u)`` with ``u = g / ||g||``, from one read of ``g``.

    ATER takes the adversarial point ``x_adv`` (``scale_a = eps_adv``) and the
    finite-difference probe (``scale_b = xi``) from the same pass-1 gradient;
    this computes both in one launch. Gradients as in :func:`normalized_step`.
    """
    return _ops.dual_normalized_step(x, g, float(scale_a), float(scale_b))


def fd_direction(x: Tensor, g0: Tensor, g1: Tensor, eps: float, *, out: Optional[Tensor] = None) -> Tensor:
    """``x + eps * (g1 - g0) / ||g1 - g0||`` per row: the paper's Eq. 15.

    With ``g0 = grad_x L(x)`` and ``g1 = grad_x L(x + xi * g0 / ||g0||)``, the
    normalised difference approximates the direction ``H g0 / ||H g0||`` in
    which the input-gradient norm grows fastest; ``xi`` cancels in the
    normalisation. The difference is taken in fp32 (fp64 for fp64 inputs).
    Gradients flow to ``x`` only. ``out`` as in :func:`normalized_step`.
    """
    if out is not None:
        _ops.fd_direction.out(x, g0, g1, float(eps), out=out)
        return out
    return _ops.fd_direction(x, g0, g1, float(eps))


def row_norm(g: Tensor) -> Tensor:
    """``[B]`` per-row L2 norms of a ``[B, ...]`` tensor, in ``g``'s dtype.

    Differentiable (also twice); the gradient of a zero row is zero.
    """
    return _ops.row_norm(g)


# ---------------------------------------------------------------- fake kernels
def _check_like_fake(op: str, names, tensors) -> None:
    first_name, first = names[0], tensors[0]
    torch._check(first.dim() >= 1, lambda: f"ater_ext::{op}: {first_name} must have a leading batch dimension, got a 0-d tensor")
    for name, t in zip(names[1:], tensors[1:]):
        torch._check(
            t.shape == first.shape and t.dtype == first.dtype and t.device == first.device,
            lambda: f"ater_ext::{op}: {first_name} and {name} must have the same shape, dtype and device, got "
            f"{first_name} {list(first.shape)} {first.dtype} {first.device} and {name} {list(t.shape)} {t.dtype} {t.device}",
        )


@torch.library.register_fake("ater_ext::normalized_step")
def _normalized_step_fake(x, g, scale):
    _check_like_fake("normalized_step", ("x", "g"), (x, g))
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("ater_ext::dual_normalized_step")
def _dual_normalized_step_fake(x, g, scale_a, scale_b):
    _check_like_fake("dual_normalized_step", ("x", "g"), (x, g))
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("ater_ext::fd_direction")
def _fd_direction_fake(x, g0, g1, eps):
    _check_like_fake("fd_direction", ("x", "g0", "g1"), (x, g0, g1))
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("ater_ext::normalized_step.out")
def _normalized_step_out_fake(x, g, scale, *, out):
    _check_like_fake("normalized_step", ("x", "g", "out"), (x, g, out))


@torch.library.register_fake("ater_ext::fd_direction.out")
def _fd_direction_out_fake(x, g0, g1, eps, *, out):
    _check_like_fake("fd_direction", ("x", "g0", "g1", "out"), (x, g0, g1, out))


@torch.library.register_fake("ater_ext::row_norm")
def _row_norm_fake(g):
    _check_like_fake("row_norm", ("g",), (g,))
    return g.new_empty(g.shape[:1])


@torch.library.register_fake("ater_ext::row_norm_backward")
def _row_norm_backward_fake(grad, g, norm):
    _check_like_fake("row_norm_backward", ("g",), (g,))
    return torch.empty_like(g, memory_format=torch.contiguous_format)


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


def _row_norm_setup(ctx, inputs, output):
    (g,) = inputs
    ctx.save_for_backward(g, output)


def _row_norm_backward(ctx, grad):
    g, norm = ctx.saved_tensors
    return _ops.row_norm_backward(grad, g, norm)


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


torch.library.register_autograd("ater_ext::normalized_step", _step_backward)
torch.library.register_autograd("ater_ext::dual_normalized_step", _dual_step_backward)
torch.library.register_autograd("ater_ext::fd_direction", _fd_direction_backward)
torch.library.register_autograd("ater_ext::row_norm", _row_norm_backward, setup_context=_row_norm_setup)
torch.library.register_autograd(
    "ater_ext::row_norm_backward", _row_norm_double_backward, setup_context=_row_norm_backward_setup
)
