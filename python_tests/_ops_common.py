"""Helpers shared by the op tests: devices, dtypes, data makers, tolerances.

Tolerances are derived, not tuned: the op and the oracle
(``ater_ext.reference``) both compute in the accumulation dtype (fp32, or fp64
for fp64 inputs) and round the result once to the output dtype, so they may
differ by a few ulps of the accumulation dtype (different summation order,
``v * (1/n)`` against ``v / n``) plus one ulp of the output dtype.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import pytest
import torch


HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float64, id="fp64"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
REDUCED = (torch.float16, torch.bfloat16)

# The steps whose gradient is the identity in x and nothing in the directions
# (the perturbation is a constant); fd_sphere_step has the true gradient in every input.
IDENTITY_STEP_OPS = ("normalized_step", "dual_normalized_step", "fd_direction")
STEP_OPS = IDENTITY_STEP_OPS + ("fd_sphere_step",)
ALL_OPS = STEP_OPS + ("row_norm",)
# Default scalars of each step op (dual: two different step lengths; fd_sphere_step: step, eps).
SCALES = {"normalized_step": (0.75,), "dual_normalized_step": (0.75, 3.0), "fd_direction": (2.0,),
          "fd_sphere_step": (1.5, 2.0)}
# Tensor arguments after x: the directions (fd_sphere_step: z, g0, g1).
N_DIRECTIONS = {"normalized_step": 1, "dual_normalized_step": 1, "fd_direction": 2, "fd_sphere_step": 3}


def output_scales(name: str) -> Tuple[float, ...]:
    """The step length of each output of a step op, from x (the magnitude its tolerance is taken at)."""
    return SCALES[name][-1:] if name == "fd_sphere_step" else SCALES[name]

# Bits of precision (implicit bit included) of each dtype, for ulp().
_PRECISION = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def raw_op(name: str):
    """The dispatcher op ``torch.ops.ater_ext.<name>.default``."""
    return getattr(torch.ops.ater_ext, name).default


# ----------------------------------------------------------------------- data
def sample(shape: Sequence[int], kind: str = "randn", *, gen: torch.Generator | None = None) -> torch.Tensor:
    """float64 CPU data of a given character; cast and move with ``.to``.

    Generated on the CPU in fp64 so that every device and dtype sees the same
    values (up to the cast).
    """
    shape = tuple(shape)
    f64 = dict(dtype=torch.float64, generator=gen)
    if kind == "randn":
        return torch.randn(shape, **f64)
    if kind == "uniform":  # one sign: no cancellation in the sums
        return torch.rand(shape, **f64) + 0.5
    if kind == "heavy":  # heavy-tailed: a few entries dominate the norm
        return torch.randn(shape, **f64) ** 3
    if kind == "sparse":  # mostly zeros
        return torch.randn(shape, **f64) * (torch.rand(shape, **f64) < 0.1)
    if kind == "rowscale":  # every row on its own scale, 1e-2 .. 1e2
        if len(shape) == 0 or shape[0] == 0:
            return torch.randn(shape, **f64)
        s = 10.0 ** (4 * torch.rand(shape[0], **f64) - 2)
        return torch.randn(shape, **f64) * s.reshape((-1,) + (1,) * (len(shape) - 1))
    if kind == "constant":  # every entry of a row equal
        if len(shape) == 0 or shape[0] == 0:
            return torch.randn(shape, **f64)
        c = torch.randn(shape[0], **f64)
        return c.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape).clone()
    if kind == "dyadic":  # k / 16, |k| <= 64: exact in every dtype, sums exact
        return torch.randint(-64, 65, shape, generator=gen).to(torch.float64) / 16
    raise ValueError(kind)


def make(shape, dtype, device, kind: str = "randn", *, gen=None, scale: float = 1.0) -> torch.Tensor:
    return (sample(shape, kind, gen=gen) * scale).to(dtype).to(device)


def step_inputs(name: str, shape, dtype, device, kind: str = "randn", *, gen=None):
    """(x, gs) for a step op: gs = (g,) or (g0, g1)."""
    x = make(shape, dtype, device, "randn", gen=gen)
    if name == "fd_sphere_step":  # z: x moved by a random direction, then the two gradients
        z = x + make(shape, dtype, device, "randn", gen=gen)
        return x, (z, make(shape, dtype, device, kind, gen=gen), make(shape, dtype, device, kind, gen=gen))
    return x, tuple(make(shape, dtype, device, kind, gen=gen) for _ in range(N_DIRECTIONS[name]))


def call(module, name: str, x, gs, scales) -> Tuple[torch.Tensor, ...]:
    """Calls ``module.<name>(x, *gs, *scales)``; always returns a tuple."""
    out = getattr(module, name)(x, *gs, *scales)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# ----------------------------------------------------------------- tolerances
def ulp(t: torch.Tensor) -> torch.Tensor:
    """ulp(|t|) in t's own dtype, returned as float64 (the subnormal spacing near 0)."""
    a = t.detach().double().abs().cpu()
    _, e = torch.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    spacing = torch.ldexp(torch.ones_like(a), (e - _PRECISION[t.dtype]).to(torch.float64))
    min_sub = min_subnormal(t.dtype)
    return torch.where(a == 0, torch.full_like(a, min_sub), spacing.clamp_min(min_sub))


def step_tol(dtype: torch.dtype, magnitude: float) -> Tuple[float, float]:
    """(rtol, atol) for out = x + scale * u with |x| + |scale| <= magnitude.

    atol: a few ulps of the accumulation dtype at the operands' magnitude
    (the results may sit near 0 after cancellation); rtol: 1 ulp of the output
    dtype for fp16/bf16 (rounded once from fp32), a few ulps otherwise.
    """
    if dtype == torch.float64:
        return 1e-12, 1e-12 * magnitude
    if dtype == torch.float32:
        return 1e-5, 1e-6 * magnitude
    return torch.finfo(dtype).eps, 1e-6 * magnitude


def norm_rtol(dtype: torch.dtype) -> float:
    """rtol for row norms (positive, so relative error is the right measure)."""
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 1e-5
    return torch.finfo(dtype).eps


def magnitude(x: torch.Tensor, scale: float) -> float:
    xmax = x.detach().abs().max().item() if x.numel() else 0.0
    return float(xmax) + abs(float(scale))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str = "") -> None:
    """|actual - expected| <= atol + rtol * |expected| elementwise, evaluated in
    float64 (exact for every input dtype), same shape/dtype/device; an
    infinity must be matched exactly and NaN never passes."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    if actual.numel() == 0:
        return
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    # equal values (infinities included) pass; otherwise both finite and within the bound
    ok = (a == e) | (a.isfinite() & e.isfinite() & (diff <= bound))
    if not ok.all():
        bad = ~ok
        i = int(torch.where(bad, diff - bound, torch.full_like(diff, -float("inf"))).flatten().nan_to_num(float("inf")).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements out of tolerance (rtol={rtol:g}, atol={atol:g}); "
            f"worst at flat index {i}: actual {a.flatten()[i].item()!r} expected {e.flatten()[i].item()!r} "
            f"diff {diff.flatten()[i].item():g} bound {bound.flatten()[i].item():g}"
        )


def assert_step_close(out, expected, x, scale, what=""):
    rtol, atol = step_tol(out.dtype, magnitude(x, scale))
    assert_close(out, expected, rtol=rtol, atol=atol, what=what)


def min_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def assert_norm_close(out, expected, what=""):
    # atol: one ulp of the subnormal range, where relative error means nothing
    assert_close(out, expected, rtol=norm_rtol(out.dtype), atol=min_subnormal(out.dtype), what=what)


def assert_within_ulps(actual, expected, n: int = 1, what: str = "") -> None:
    """|actual - expected| <= n ulps of the larger magnitude, in their dtype."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if actual.numel() == 0:
        return
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    spacing = torch.maximum(ulp(actual), ulp(expected))
    diff = (a - e).abs()
    bad = diff > n * spacing
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements differ by more than {n} ulp; worst diff/ulp "
        f"{(diff / spacing).max().item():g}"
    )


def exact_row_norm(g: torch.Tensor) -> torch.Tensor:
    """float64 row norms, scale-safe (max-abs first), on the CPU: the truth for
    fp32/fp16/bf16 inputs (exact to ~1e-16) and a good check for fp64."""
    rows = g.detach().double().cpu().reshape(g.shape[0], -1)
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.float64)
    m = rows.abs().amax(dim=1)
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return m * (rows / safe[:, None]).square().sum(dim=1).sqrt()



def assert_norm_matches_truth(n: torch.Tensor, g: torch.Tensor, what: str = "row_norm vs float64 truth") -> None:
    """Row norms against exact_row_norm: fp32 to a few ulps (summation order),
    fp16/bf16 rounded once (1 ulp), fp64 to ~1e-13. Norms too large for the
    dtype (inf in the op) are left out."""
    dtype = n.dtype
    rtol = {torch.float64: 1e-13, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
    truth = exact_row_norm(g)
    fits = truth <= torch.finfo(dtype).max
    assert_close(n.double().cpu()[fits], truth[fits], rtol=rtol, atol=min_subnormal(dtype), what=what)
