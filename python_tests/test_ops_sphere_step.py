"""fd_sphere_step, the fused step of the FD ascent of ||grad_x L|| on the sphere:
what the generic op matrix (test_ops_*.py, where it is one of STEP_OPS) does not
cover: its true gradient, that it lands on the sphere, its zero rows, scale
invariance, non-contiguous / empty inputs and torch.compile with backward."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from _ops_common import DEVICES, DTYPES, assert_step_close, exact_row_norm, make
from ater_ext import ops, reference

F64 = torch.float64


def inputs(shape, dtype, device, kind="randn", gen=None):
    x = make(shape, dtype, device, gen=gen)
    z = x + make(shape, dtype, device, gen=gen)
    return x, z, make(shape, dtype, device, kind, gen=gen), make(shape, dtype, device, kind, gen=gen)


@pytest.mark.parametrize("device", DEVICES)
def test_equals_the_unfused_composition_fp64(device):
    """normalized_step(x, fd_direction(z, g0, g1, step) - x, eps): the three launches it replaces."""
    x, z, g0, g1 = inputs((9, 3, 7), F64, device)
    for step, eps in ((1.5, 2.0), (1e-3, 0.3), (40.0, 1e-2)):
        want = ops.normalized_step(x, ops.fd_direction(z, g0, g1, step) - x, eps)
        torch.testing.assert_close(ops.fd_sphere_step(x, z, g0, g1, step, eps), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "heavy", "sparse", "rowscale", "dyadic"])
def test_lands_on_the_sphere_and_matches_the_reference(kind, dtype, device):
    x, z, g0, g1 = inputs((33, 129), dtype, device, kind)
    out = ops.fd_sphere_step(x, z, g0, g1, 1.5, 2.0)
    assert_step_close(out, reference.fd_sphere_step(x, z, g0, g1, 1.5, 2.0), x, 2.0, what=kind)
    # ||out - x|| = eps, to the output dtype's rounding of out (measured in float64)
    radius = exact_row_norm(out.double() - x.double())
    rtol = {F64: 1e-12, torch.float32: 1e-5}.get(dtype, 8 * torch.finfo(dtype).eps * x.abs().max().item())
    torch.testing.assert_close(radius, torch.full_like(radius, 2.0), rtol=rtol, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1e10, 1e30])
def test_gradient_scale_does_not_matter_fp32(scale, device):
    """Both normalisations are scale-safe: gradients of 1e-30 or 1e30 give the step of scale 1."""
    x, z, g0, g1 = inputs((6, 301), torch.float32, device)
    got = ops.fd_sphere_step(x, z, g0 * scale, g1 * scale, 1.5, 2.0)
    want = ops.fd_sphere_step(x, z, g0, g1, 1.5, 2.0)
    assert torch.isfinite(got).all()
    assert_step_close(got, want, x, 2.0, what=f"scale {scale:g}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows(dtype, device):
    """g1 == g0: z is not moved, only projected; z + step * u == x: the output is x (no NaN)."""
    shape = (4, 8)
    x = make(shape, dtype, device, "dyadic")
    z = x + make(shape, dtype, device, "dyadic")
    g0 = make(shape, dtype, device, "dyadic")
    g1 = g0.clone()
    g1[1:] = g1[1:] + 1  # rows 1..3 move; row 0 has a zero difference
    e = torch.zeros(shape, dtype=dtype, device=device)
    e[:, 0] = 1
    z[2] = x[2] - e[2]  # row 2: difference e (g1 = g0 + e), step 1 -> moved exactly onto x
    g1[2] = g0[2] + e[2]
    out = ops.fd_sphere_step(x, z, g0, g1, 1.0, 0.5)
    assert torch.isfinite(out).all()
    assert_step_close(out[0], ops.normalized_step(x[:1], z[:1] - x[:1], 0.5)[0], x, 0.5, what="zero difference")
    assert torch.equal(out[2], x[2]), "a moved point equal to the centre must give the centre"


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_row(device):
    x, z, g0, g1 = inputs((3, 17), torch.float32, device)
    g1[1, 5] = float("nan")
    out = ops.fd_sphere_step(x, z, g0, g1, 1.5, 2.0)
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_empty_inputs(dtype, device):
    x, z, g0, g1 = inputs((8, 6, 10), dtype, device)
    views = [t.transpose(1, 2) for t in (x, z, g0, g1)]  # the same [8, 10, 6] rows, strided
    out = ops.fd_sphere_step(*views, 1.5, 2.0)
    assert out.is_contiguous() and out.shape == views[0].shape
    want = ops.fd_sphere_step(*[v.contiguous() for v in views], 1.5, 2.0)
    assert torch.equal(out, want)
    for shape in ((0, 5), (3, 0)):
        empty = [make(shape, dtype, device) for _ in range(4)]
        got = ops.fd_sphere_step(*empty, 1.5, 2.0)
        assert got.shape == shape and got.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_in_every_tensor(device):
    """The true derivative (the projection depends on x and z, the direction on g0, g1), twice."""
    x, z, g0, g1 = (t.requires_grad_() for t in inputs((3, 2, 4), F64, device))

    def f(x, z, g0, g1):
        return ops.fd_sphere_step(x, z, g0, g1, 1.5, 2.0)

    assert gradcheck(f, (x, z, g0, g1))
    assert gradgradcheck(f, (x, z, g0, g1))


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_equals_autograd_of_the_plain_formula(device):
    """Against autograd through the formula written with torch.nn.functional.normalize,
    with a zero difference row (where the op's normalisation contributes nothing)."""
    x, z, g0, g1 = inputs((5, 11), F64, device)
    g1[3] = g0[3]
    w = make((5, 11), F64, device)
    ours = [t.clone().requires_grad_() for t in (x, z, g0, g1)]
    got = torch.autograd.grad((ops.fd_sphere_step(*ours, 1.5, 2.0) * w).sum(), ours)
    xt, zt, g0t, g1t = twin = [t.clone().requires_grad_() for t in (x, z, g0, g1)]
    moved = zt + 1.5 * torch.nn.functional.normalize(g1t - g0t, dim=1) - xt
    want = torch.autograd.grad(((xt + 2.0 * torch.nn.functional.normalize(moved, dim=1)) * w).sum(), twin)
    rows = [0, 1, 2, 4]  # F.normalize's gradient at a zero row is w / 1e-12: not a reference there
    for a, b, name in zip(got, want, ("x", "z", "g0", "g1")):
        torch.testing.assert_close(a[rows], b[rows], rtol=1e-10, atol=1e-12, msg=name)
    for a, b, name in zip(got[:2], want[:2], ("x", "z")):
        torch.testing.assert_close(a[3], b[3], rtol=1e-10, atol=1e-12, msg=f"{name} zero-difference row")
    assert torch.equal(got[2][3], torch.zeros_like(got[2][3])) and torch.equal(got[3][3], torch.zeros_like(got[3][3]))
    # and the pure-PyTorch twin (scale-safe normalisation, zero rows as the op's), every row
    twin = [t.clone().requires_grad_() for t in (x, z, g0, g1)]
    want_twin = torch.autograd.grad((reference.fd_sphere_step(*twin, 1.5, 2.0) * w).sum(), twin)
    for a, b, name in zip(got, want_twin, ("x", "z", "g0", "g1")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} vs reference")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_grad_equals_autograd(device):
    x, z, g0, g1 = inputs((4, 6), F64, device)
    w = make((4, 6), F64, device)
    got = torch.func.grad(lambda t: (ops.fd_sphere_step(x, t, g0, g1, 1.5, 2.0) * w).sum())(z)
    zz = z.clone().requires_grad_()
    (want,) = torch.autograd.grad((ops.fd_sphere_step(x, zz, g0, g1, 1.5, 2.0) * w).sum(), zz)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_torch_compile_forward_and_backward(backend, device, dynamo_reset):
    def f(x, z, g0, g1):
        return (ops.fd_sphere_step(x, z, g0, g1, 1.5, 2.0) ** 2).sum()

    args = [t.requires_grad_() for t in inputs((6, 3, 4), F64, device)]
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(f(*args), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_torch_compile_dynamic_shapes(dynamo_reset):
    f = torch.compile(lambda *t: ops.fd_sphere_step(*t, 1.5, 2.0), fullgraph=True, backend="aot_eager",
                      dynamic=True)
    for shape in [(3, 5), (7, 11), (2, 40)]:
        args = inputs(shape, torch.float32, "cpu")
        assert_step_close(f(*args), ops.fd_sphere_step(*args, 1.5, 2.0), args[0], 2.0, what=str(shape))
