"""The oracle itself: ater_ext.reference against an independent float64 NumPy
computation, so that the op tests compare against something trustworthy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ater_ext import reference

SHAPES = [(1, 1), (5,), (6, 13), (4, 3, 5, 5), (3, 4099)]


def np_normalize(v: np.ndarray) -> np.ndarray:
    rows = v.reshape(v.shape[0], -1).astype(np.float64)
    n = np.sqrt((rows * rows).sum(axis=1, keepdims=True))
    return np.divide(rows, n, out=np.zeros_like(rows), where=n > 0)


def np_row_norm(v: np.ndarray) -> np.ndarray:
    rows = v.reshape(v.shape[0], -1).astype(np.float64)
    return np.sqrt((rows * rows).sum(axis=1))


def np_step(x: np.ndarray, u: np.ndarray, scale: float) -> np.ndarray:
    return (x.reshape(u.shape).astype(np.float64) + scale * u).reshape(x.shape)


def data(shape, dtype, zero_row=True):
    v = torch.randn(shape, dtype=torch.float64)
    if zero_row and v.dim() >= 1 and v.shape[0] > 1:
        v[1] = 0
    return v.to(dtype)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-13), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_normalize_and_row_norm_match_numpy(shape, dtype, rtol):
    g = data(shape, dtype)
    g_np = g.double().numpy()  # the exact values the oracle sees
    u = reference.normalize(g)
    assert u.dtype == dtype and u.shape == (shape[0], int(np.prod(shape[1:], dtype=np.int64)))
    np.testing.assert_allclose(u.double().numpy(), np_normalize(g_np), rtol=rtol, atol=rtol)
    n = reference.row_norm(g)
    assert n.dtype == dtype and n.shape == (shape[0],)
    np.testing.assert_allclose(n.double().numpy(), np_row_norm(g_np), rtol=rtol, atol=0)
    if shape[0] > 1:  # the zero row: exactly zero, no NaN
        assert torch.equal(u[1], torch.zeros_like(u[1])) and n[1].item() == 0.0


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-13), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", [(6, 13), (4, 3, 5, 5)], ids=str)
def test_reference_steps_match_numpy(shape, dtype, rtol):
    x, g, g0, g1 = (data(shape, dtype, zero_row=False) for _ in range(4))
    g[1] = 0
    g1[2] = g0[2]  # zero difference row
    xn, gn, g0n, g1n = (t.double().numpy() for t in (x, g, g0, g1))
    atol = rtol * (np.abs(xn).max() + 3.0)
    out = reference.normalized_step(x, g, 0.75)
    np.testing.assert_allclose(out.double().numpy(), np_step(xn, np_normalize(gn), 0.75), rtol=rtol, atol=atol)
    a, b = reference.dual_normalized_step(x, g, 0.75, 3.0)
    np.testing.assert_allclose(a.double().numpy(), np_step(xn, np_normalize(gn), 0.75), rtol=rtol, atol=atol)
    np.testing.assert_allclose(b.double().numpy(), np_step(xn, np_normalize(gn), 3.0), rtol=rtol, atol=atol)
    fd = reference.fd_direction(x, g0, g1, 2.0)
    np.testing.assert_allclose(fd.double().numpy(), np_step(xn, np_normalize(g1n - g0n), 2.0), rtol=rtol, atol=atol)
    for t in (out, a, b, fd):
        assert t.dtype == dtype and t.shape == x.shape
    assert torch.equal(out[1], x[1]) and torch.equal(fd[2], x[2])


@pytest.mark.parametrize(
    "dtype,scale", [(torch.float32, 1e-30), (torch.float32, 1e30), (torch.float64, 1e-200), (torch.float64, 1e200)]
)
def test_reference_is_scale_safe(dtype, scale):
    base = torch.randn(4, 50, dtype=torch.float64)
    g = (base * scale).to(dtype)
    expected_u = np_normalize(base.to(dtype).double().numpy())  # scale-free: normalise the unscaled values
    rtol = 1e-13 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(reference.normalize(g).double().numpy(), expected_u, rtol=rtol, atol=rtol)
    ratio = reference.row_norm(g).double().numpy() / (np_row_norm(base.to(dtype).double().numpy()) * scale)
    np.testing.assert_allclose(ratio, 1.0, rtol=10 * rtol)
