"""The ops as PyTorch operators: schemas, torch.library.opcheck (fake kernels,
autograd registration, AOT dispatch), meta tensors and torch.compile."""
from __future__ import annotations

import pytest
import torch

from _ops_common import DEVICES, SCALES, STEP_OPS, assert_norm_close, assert_step_close, make, raw_op
from ater_ext import ops

OP_NAMES = STEP_OPS + ("row_norm", "row_norm_backward")


def test_schemas_are_registered():
    for name in OP_NAMES:
        assert hasattr(torch.ops.ater_ext, name), name
    assert str(raw_op("fd_direction")._schema) == (
        "ater_ext::fd_direction(Tensor x, Tensor g0, Tensor g1, float eps) -> Tensor"
    )
    assert str(raw_op("row_norm")._schema) == "ater_ext::row_norm(Tensor g) -> Tensor"


# --------------------------------------------------------------------- opcheck
def opcheck_args(name, shape, dtype, device, grad):
    """(args) for the raw op; grad: which tensors require grad."""
    def t(kind="randn", shape=shape, rg=False):
        return make(shape, dtype, device, kind).requires_grad_(rg)

    if name in ("normalized_step", "dual_normalized_step"):
        g = t()
        if shape[0] > 1:
            g[1] = 0  # a zero row
        return (t(rg=grad in ("x", "all")), g.requires_grad_(grad == "all"), *SCALES[name])
    if name == "fd_direction":
        g0, g1 = t(rg=grad == "all"), t(rg=grad == "all")
        return (t(rg=grad in ("x", "all")), g0, g1, *SCALES[name])
    if name == "fd_sphere_step":
        g0, g1 = t(), t()
        if shape[0] > 1:
            g1[1] = g0[1]  # a zero difference row
        z = t(rg=grad == "all")
        return (t(rg=grad in ("x", "all")), z, g0.requires_grad_(grad == "all"), g1.requires_grad_(grad == "all"),
                *SCALES[name])
    if name == "row_norm":
        g = t(rg=grad != "none")
        return (g,)
    b = shape[0]
    return (t(shape=(b,), rg=grad != "none"), t(rg=grad != "none"), t("uniform", shape=(b,), rg=grad != "none"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("grad", ["none", "x", "all"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(name, grad, dtype, device):
    if name in ("row_norm", "row_norm_backward") and grad == "x":
        pytest.skip("one kind of grad input only")
    args = opcheck_args(name, (4, 3, 5), dtype, device, grad)
    torch.library.opcheck(raw_op(name), args)


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=str)
def test_opcheck_empty(name, shape):
    torch.library.opcheck(raw_op(name), opcheck_args(name, shape, torch.float32, "cpu", "none"))


# ------------------------------------------------------------------------ meta
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (7,), (0, 3), (3, 0)], ids=str)
def test_meta_tensors(shape, dtype):
    x = torch.empty(shape, dtype=dtype, device="meta")
    g = torch.empty(shape, dtype=dtype, device="meta")
    outs = [ops.normalized_step(x, g, 0.5), *ops.dual_normalized_step(x, g, 0.5, 2.0), ops.fd_direction(x, g, g, 2.0),
            ops.fd_sphere_step(x, g, g, g, 1.5, 2.0)]
    outs.append(torch.ops.ater_ext.row_norm_backward(torch.empty(shape[0], dtype=dtype, device="meta"), g,
                                                     torch.empty(shape[0], dtype=dtype, device="meta")))
    for out in outs:
        assert out.device.type == "meta" and out.shape == shape and out.dtype == dtype and out.is_contiguous()
    n = ops.row_norm(g)
    assert n.device.type == "meta" and n.shape == (shape[0],) and n.dtype == dtype


def test_meta_channels_last_output_is_contiguous():
    x = torch.empty(2, 3, 4, 5, device="meta").contiguous(memory_format=torch.channels_last)
    out = ops.normalized_step(x, x, 0.5)
    assert out.shape == x.shape and out.is_contiguous()


# --------------------------------------------------------------- torch.compile
def ater_like(x, g, g1):
    """The op sequence of an ATER step, with some arithmetic around it."""
    x_adv, probe = ops.dual_normalized_step(x, g, 2.0, 1e-3)
    x_max = ops.fd_direction(x, g, g1, 2.0)
    again = ops.normalized_step(x, g, 0.5)
    ascended = ops.fd_sphere_step(x, x_max, g1, g, 1.0, 2.0)
    n = ops.row_norm(x_max - x)
    return x_adv, probe, x_max, again, ascended, n, ops.row_norm(g) * 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_torch_compile_fullgraph_matches_eager(backend, device, dynamo_reset):
    x = make((6, 3, 4, 4), torch.float32, device)
    g = make((6, 3, 4, 4), torch.float32, device)
    g[1] = 0
    g1 = g + 1e-2 * make((6, 3, 4, 4), torch.float32, device)
    compiled = torch.compile(ater_like, fullgraph=True, backend=backend)
    got, want = compiled(x, g, g1), ater_like(x, g, g1)
    for a, b, s in zip(got[:5], want[:5], (2.0, 1e-3, 2.0, 0.5, 2.0)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_step_close(a, b, x, s, what=f"{backend}")
    for a, b in zip(got[5:], want[5:]):
        assert_norm_close(a, b, what=f"{backend} row_norm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_torch_compile_backward_matches_eager(backend, device, dynamo_reset):
    def loss_fn(x, g, w):
        x_adv = ops.normalized_step(x, g, 0.5)
        return (ops.row_norm(x_adv * w) ** 2).sum() + ops.row_norm(w).sum()

    x = make((5, 7), torch.float64, device).requires_grad_()
    g = make((5, 7), torch.float64, device)
    w = make((5, 7), torch.float64, device)
    w[2] = 0  # a zero row in row_norm(w): zero gradient
    w.requires_grad_()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    gx, gw = torch.autograd.grad(compiled(x, g, w), (x, w))
    ex, ew = torch.autograd.grad(loss_fn(x, g, w), (x, w))
    torch.testing.assert_close(gx, ex, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(gw).all()


def test_torch_compile_dynamic_shapes(dynamo_reset):
    f = torch.compile(lambda x, g: (ops.normalized_step(x, g, 0.5), ops.row_norm(g)), fullgraph=True,
                      backend="aot_eager", dynamic=True)
    for shape in [(3, 5), (7, 11), (2, 40)]:
        x, g = make(shape, torch.float32, "cpu"), make(shape, torch.float32, "cpu")
        out, n = f(x, g)
        assert_step_close(out, ops.normalized_step(x, g, 0.5), x, 0.5, what=str(shape))
        assert_norm_close(n, ops.row_norm(g), what=str(shape))
