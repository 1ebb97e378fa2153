"""Pure-PyTorch twins of ater_ext's fused ops: the tests' oracle.

Written for clarity, not speed, and independent of the fast path (this module
imports nothing from ``ater_ext.ops`` or the compiled extension). Every norm is
the per-row L2 norm over all non-batch dimensions, accumulated in fp32 (fp64
for fp64 inputs), computed the scale-safe way: divide by the row's max-abs
before squaring, so rows of 1e-30 or 1e30 in fp32 still normalise to unit
vectors, and a zero row normalises to zero (never NaN).
"""
from __future__ import annotations

import torch

__all__ = ["acc_dtype", "normalize", "row_norm", "normalized_step", "dual_normalized_step", "fd_direction"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(v: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, D] in the accumulation dtype."""
    return v.reshape(v.shape[0], -1).to(acc_dtype(v.dtype))


def _scaled_rows(v: torch.Tensor):
    """(v / m, m, s) per row with m = max|v| (1 for zero rows) and s = sum (v/m)^2."""
    rows = _rows(v)
    if rows.shape[1] == 0:
        m = rows.new_zeros(rows.shape[0])
    else:
        m = rows.abs().amax(dim=1)
    m = torch.where(m > 0, m, torch.ones_like(m))
    scaled = rows / m[:, None]
    return scaled, m, scaled.square().sum(dim=1)


def normalize(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| per row, in the accumulation dtype, shape [B, D]; zero rows stay 0."""
    scaled, _, s = _scaled_rows(v)
    root = s.sqrt()
    return torch.where(root[:, None] > 0, scaled / torch.where(root > 0, root, 1.0)[:, None], 0.0)


def row_norm(g: torch.Tensor) -> torch.Tensor:
    """[B] per-row L2 norms in g's dtype; differentiable (plain autograd).

    The zero-row gradient is 0: the formula is written so that autograd never
    divides by a zero norm.
    """
    scaled, m, s = _scaled_rows(g)
    safe_s = torch.where(s > 0, s, torch.ones_like(s))
    norm = torch.where(s > 0, m * safe_s.sqrt(), torch.zeros_like(s))
    return norm.to(g.dtype)


def _step(x: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    # The perturbation is a constant: gradients reach x only (identity).
    out = x.reshape(x.shape[0], -1).to(u.dtype) + scale * u.detach()
    return out.to(x.dtype).reshape(x.shape)


def normalized_step(x: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """x + scale * normalize(g)."""
    return _step(x, normalize(g), scale)


def dual_normalized_step(x: torch.Tensor, g: torch.Tensor, scale_a: float, scale_b: float):
    """(x + scale_a * normalize(g), x + scale_b * normalize(g))."""
    u = normalize(g)
    return _step(x, u, scale_a), _step(x, u, scale_b)


def fd_direction(x: torch.Tensor, g0: torch.Tensor, g1: torch.Tensor, eps: float) -> torch.Tensor:
    """x + eps * normalize(g1 - g0), the difference taken in the accumulation dtype (Eq. 15)."""
    diff = _rows(g1) - _rows(g0)
    return _step(x, normalize(diff), eps)
