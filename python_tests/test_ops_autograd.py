"""Autograd of the fused ops: row_norm (first and second order, zero rows
included) and the steps, whose gradient reaches x as the identity and never
reaches the direction tensors."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from _ops_common import (DEVICES, DTYPES, IDENTITY_STEP_OPS, N_DIRECTIONS, REDUCED, SCALES, STEP_OPS, assert_close, make,
                         min_subnormal)
from ater_ext import ops, reference

F64 = torch.float64


def with_zero_rows(g: torch.Tensor, rows=(1,)) -> torch.Tensor:
    g = g.clone()
    for r in rows:
        g[r] = 0
    return g


# ------------------------------------------------------------------ row_norm
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 3), (5,), (2, 1)], ids=str)
def test_row_norm_gradcheck_with_zero_row(shape, device):
    g = with_zero_rows(make(shape, F64, device)).requires_grad_()
    assert gradcheck(ops.row_norm, (g,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 33), (5, 3, 4, 4), (4, 4099)], ids=str)
def test_row_norm_gradient_values(shape, dtype, device):
    """d/dg sum_b w_b ||g_b|| = w_b g_b / ||g_b||; exactly 0 on zero rows."""
    g = with_zero_rows(make(shape, dtype, device), rows=(0, 2)).requires_grad_()
    w = make((shape[0],), dtype, device)
    ops.row_norm(g).backward(w)
    assert g.grad is not None and g.grad.shape == g.shape and g.grad.dtype == dtype
    assert torch.isfinite(g.grad).all()
    assert torch.equal(g.grad[0], torch.zeros_like(g.grad[0])) and torch.equal(g.grad[2], torch.zeros_like(g.grad[2]))
    # float64 truth of the same values
    gd = g.detach().double()
    rows = gd.reshape(shape[0], -1)
    n = rows.norm(dim=1)
    truth = (w.double()[:, None] * rows / torch.where(n > 0, n, 1.0)[:, None]).reshape(shape)
    # fp16/bf16: the saved norm is itself rounded to the dtype, then the gradient: 2 roundings
    rtol = {F64: 1e-12, torch.float32: 1e-5}.get(dtype, 2 * torch.finfo(dtype).eps if dtype in REDUCED else 0)
    atol = 1e-6 * w.abs().max().item() + min_subnormal(dtype)
    assert_close(g.grad.double(), truth, rtol=rtol, atol=atol, what="row_norm gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2), (4,)], ids=str)
def test_row_norm_gradgradcheck(shape, device):
    # row_norm is not differentiable twice at a zero row (its gradient jumps
    # there), so the finite-difference check uses non-zero rows only; the
    # zero-row behaviour of the double backward is tested below.
    g = make(shape, F64, device, "uniform").requires_grad_()
    assert gradgradcheck(ops.row_norm, (g,))


@pytest.mark.parametrize("device", DEVICES)
def test_row_norm_double_backward_values_and_zero_row(device):
    """H v for f = sum_b w_b ||g_b||: w_b (v_b - u_b (u_b . v_b)) / ||g_b||, 0 on zero rows."""
    shape = (5, 3, 4)
    g = with_zero_rows(make(shape, F64, device), rows=(3,)).requires_grad_()
    w = make((5,), F64, device)
    v = make(shape, F64, device)
    (grad,) = torch.autograd.grad((ops.row_norm(g) * w).sum(), g, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * v).sum(), g)
    assert torch.isfinite(hvp).all()
    assert torch.equal(hvp[3], torch.zeros_like(hvp[3]))
    rows, vr = g.detach().reshape(5, -1), v.reshape(5, -1)
    n = rows.norm(dim=1, keepdim=True)
    u = rows / torch.where(n > 0, n, 1.0)
    expected = w[:, None] * (vr - u * (u * vr).sum(1, keepdim=True)) / torch.where(n > 0, n, 1.0)
    expected[3] = 0
    assert_close(hvp, expected.reshape(shape), rtol=1e-12, atol=1e-12, what="double backward of row_norm")
    # the pure-PyTorch oracle agrees on the non-zero rows
    g_ref = g.detach().clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad((reference.row_norm(g_ref) * w).sum(), g_ref, create_graph=True)
    (hvp_ref,) = torch.autograd.grad((grad_ref * v).sum(), g_ref)
    keep = [0, 1, 2, 4]
    assert_close(hvp[keep], hvp_ref[keep], rtol=1e-10, atol=1e-12, what="double backward vs reference")


@pytest.mark.parametrize("device", DEVICES)
def test_row_norm_backward_op_gradcheck(device):
    """The raw op grad[b] * g[b] / norm[b], as a function of all three inputs."""
    grad = make((4,), F64, device).requires_grad_()
    g = make((4, 2, 3), F64, device).requires_grad_()
    norm = (make((4,), F64, device, "uniform") + 0.5).requires_grad_()
    op = torch.ops.ater_ext.row_norm_backward
    assert gradcheck(op, (grad, g, norm))
    assert gradgradcheck(op, (grad, g, norm))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_norm_backward_op_values(dtype, device):
    grad = make((5,), dtype, device)
    g = make((5, 7, 3), dtype, device)
    norm = make((5,), dtype, device, "uniform")
    norm[2] = 0
    out = torch.ops.ater_ext.row_norm_backward(grad, g, norm)
    assert out.shape == g.shape and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # zero norm: zero gradient, not NaN
    expected = (grad.double()[:, None, None] * g.double() / torch.where(norm > 0, norm, 1).double()[:, None, None])
    expected[2] = 0
    rtol = {F64: 1e-12, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
    assert_close(out.double(), expected, rtol=rtol, atol=min_subnormal(dtype), what="row_norm_backward")


# --------------------------------------------------------------------- steps
def step_args(name, shape, dtype, device, zero_row=True):
    x = make(shape, dtype, device).requires_grad_()
    gs = [make(shape, dtype, device) for _ in range(N_DIRECTIONS[name])]
    if zero_row:
        gs[-1][0] = 0
    return x, [t.requires_grad_() for t in gs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", IDENTITY_STEP_OPS)
def test_step_gradient_is_identity_in_x_and_none_in_g(name, dtype, device):
    shape = (6, 3, 5)
    x, gs = step_args(name, shape, dtype, device)
    outs = getattr(ops, name)(x, *gs, *SCALES[name])
    outs = outs if isinstance(outs, tuple) else (outs,)
    ups = [make(shape, dtype, device) for _ in outs]
    torch.autograd.backward(outs, ups)
    expected = ups[0] if len(ups) == 1 else ups[0] + ups[1]
    assert x.grad is not None and torch.equal(x.grad, expected), f"{name}: x.grad is not the upstream gradient"
    for i, t in enumerate(gs):
        assert t.grad is None, f"{name}: gradient reached direction input {i}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", [0, 1])
def test_dual_step_gradient_with_one_output_used(which, device):
    x, (g,) = step_args("dual_normalized_step", (4, 9), torch.float32, device)
    out = ops.dual_normalized_step(x, g, 0.5, 2.0)[which]
    up = make((4, 9), torch.float32, device)
    out.backward(up)
    assert torch.equal(x.grad, up)
    assert g.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", IDENTITY_STEP_OPS)
def test_step_only_direction_requires_grad(name, device):
    """x constant, g requiring grad: nothing may reach g (x_max is a constant)."""
    x, gs = step_args(name, (3, 4), torch.float32, device)
    x = x.detach()
    outs = getattr(ops, name)(x, *gs, *SCALES[name])
    outs = outs if isinstance(outs, tuple) else (outs,)
    if outs[0].requires_grad:
        sum(o.sum() for o in outs).backward()
    for t in gs:
        assert t.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", IDENTITY_STEP_OPS)
def test_step_gradcheck_in_x(name, device):
    x, gs = step_args(name, (3, 2, 4), F64, device)
    gs = [t.detach() for t in gs]

    def f(x):
        return getattr(ops, name)(x, *gs, *SCALES[name])

    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))


# ------------------------------------------------------------------ torch.func
def _torch_row_norm(g):
    """The independent twin: torch.linalg.vector_norm over every trailing dim."""
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)


@pytest.mark.parametrize("device", DEVICES)
def test_func_grad_vjp_jacrev_of_row_norm(device):
    g = make((4, 3, 2), F64, device)
    w = make((4,), F64, device)

    def ours(t):
        return (ops.row_norm(t) * w).sum()

    def theirs(t):
        return (_torch_row_norm(t) * w).sum()

    torch.testing.assert_close(torch.func.grad(ours)(g), torch.func.grad(theirs)(g), rtol=1e-12, atol=1e-12)
    out, vjp_fn = torch.func.vjp(ops.row_norm, g)
    out_t, vjp_t = torch.func.vjp(_torch_row_norm, g)
    torch.testing.assert_close(out, out_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vjp_fn(w)[0], vjp_t(w)[0], rtol=1e-12, atol=1e-12)
    jac = torch.func.jacrev(ops.row_norm)(g)
    assert jac.shape == (4, 4, 3, 2)
    torch.testing.assert_close(jac, torch.func.jacrev(_torch_row_norm)(g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_func_second_order_of_row_norm(device):
    """grad of (grad . v): the Hessian-vector product through row_norm_backward's own
    formula, under torch.func (the double-backward test above does it with autograd.grad)."""
    g = make((3, 5), F64, device, "uniform")
    v = make((3, 5), F64, device)

    def hvp(f):
        return torch.func.grad(lambda t: (torch.func.grad(lambda s: f(s).sum())(t) * v).sum())(g)

    torch.testing.assert_close(hvp(ops.row_norm), hvp(_torch_row_norm), rtol=1e-10, atol=1e-12)
    # the Hessian itself, by jacrev of grad (vmap over row_norm_backward's backward)
    hess = torch.func.jacrev(torch.func.grad(lambda s: ops.row_norm(s).sum()))(g)
    hess_t = torch.func.jacrev(torch.func.grad(lambda s: _torch_row_norm(s).sum()))(g)
    torch.testing.assert_close(hess, hess_t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_dim", [0, 1, 2])
def test_vmap_row_norm(in_dim, device):
    """vmap over any dim: the per-example norms, exactly as a Python loop of the op."""
    g = make((5, 4, 6), F64, device).movedim(0, in_dim).contiguous()
    g.select(in_dim, 2)[1] = 0  # a zero row in one example
    got = torch.vmap(ops.row_norm, in_dims=in_dim)(g)
    loop = torch.stack([ops.row_norm(g.select(in_dim, i)) for i in range(g.shape[in_dim])])
    assert torch.equal(got, loop)
    want = torch.stack([_torch_row_norm(g.select(in_dim, i)) for i in range(g.shape[in_dim])])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_gradients_vmap_of_grad(device):
    """torch.func's per-sample-gradient idiom over row_norm (vmap(grad(f)))."""
    g = make((6, 3, 4), F64, device)

    def per_example(t):  # t: [3, 4]
        return ops.row_norm(t).square().sum() + ops.row_norm(t).sum()

    got = torch.vmap(torch.func.grad(per_example))(g)
    want = torch.vmap(torch.func.grad(lambda t: _torch_row_norm(t).square().sum() + _torch_row_norm(t).sum()))(g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _call_step(name, x, gs):
    out = getattr(ops, name)(x, *gs, *SCALES[name])
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batched", ["x", "g", "both"])
@pytest.mark.parametrize("name", STEP_OPS)
def test_vmap_steps_equal_a_loop(name, batched, device):
    n, shape = 3, (4, 2, 5)
    x, gs = step_args(name, shape, F64, device)
    x, gs = x.detach(), [t.detach() for t in gs]
    xb = make((n, *shape), F64, device) if batched in ("x", "both") else x
    gb = [make((n, *shape), F64, device) for _ in gs] if batched in ("g", "both") else gs
    x_dim = 0 if batched in ("x", "both") else None
    g_dim = 0 if batched in ("g", "both") else None
    got = torch.vmap(lambda x_, *g_: _call_step(name, x_, g_), in_dims=(x_dim, *[g_dim] * len(gs)))(xb, *gb)
    for i in range(n):
        xi = xb[i] if x_dim == 0 else xb
        gi = [t[i] if g_dim == 0 else t for t in gb]
        for a, b in zip(got, _call_step(name, xi, gi)):
            assert torch.equal(a[i], b), f"{name} vmap example {i}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", IDENTITY_STEP_OPS)
def test_func_grad_and_jacrev_of_steps(name, device):
    """d out / d x is the identity under torch.func too; no gradient reaches the directions."""
    shape = (3, 4)
    x, gs = step_args(name, shape, F64, device)
    x, gs = x.detach(), [t.detach() for t in gs]
    w = make(shape, F64, device)
    grad_x = torch.func.grad(lambda t: sum((o * w).sum() for o in _call_step(name, t, gs)))(x)
    torch.testing.assert_close(grad_x, w * len(SCALES[name]), rtol=0, atol=0)
    grad_g = torch.func.grad(lambda t: sum(o.sum() for o in _call_step(name, x, [*gs[:-1], t])))(gs[-1])
    assert torch.equal(grad_g, torch.zeros_like(grad_g))
    jac = torch.func.jacrev(lambda t: _call_step(name, t, gs)[0])(x)
    torch.testing.assert_close(jac.reshape(12, 12), torch.eye(12, dtype=F64, device=device), rtol=0, atol=0)


def test_vmap_of_zero_d_examples_refused_by_the_op():
    """vmap over a [N] tensor hands the op 0-d examples: the op's own error, not a reshape error."""
    with pytest.raises(RuntimeError, match="ater_ext::row_norm: g must have a leading batch dimension"):
        torch.vmap(ops.row_norm)(torch.randn(5))


def test_raw_op_under_torch_func_grad_names_the_wrapper():
    with pytest.raises(RuntimeError, match=r"ater_ext::row_norm: under torch.func .*ater_ext.ops.row_norm"):
        torch.func.grad(lambda t: torch.ops.ater_ext.row_norm(t).sum())(torch.randn(3, 4))
