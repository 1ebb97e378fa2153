"""The ``out=`` overloads (``normalized_step.out``, ``fd_direction.out``): same
values as the functional ops, in place into x allowed, bad buffers rejected
with a message that names the op, and clean under opcheck / torch.compile."""
from __future__ import annotations

import pytest
import torch

from _ops_common import DEVICES, DTYPES, SCALES, call, make, requires_cuda, step_inputs
from ater_ext import ops

OUT_OPS = ("normalized_step", "fd_direction")


def with_out(name, x, gs, out):
    return getattr(ops, name)(x, *gs, *SCALES[name], out=out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (4, 3, 5, 5), (3, 4099), (0, 5), (3, 0)], ids=str)
@pytest.mark.parametrize("name", OUT_OPS)
def test_out_matches_functional(name, shape, dtype, device):
    x, gs = step_inputs(name, shape, dtype, device)
    if shape[0] > 1:
        gs[-1][1] = 0  # a zero (difference) row
    expected = call(ops, name, x, gs, SCALES[name])[0]
    out = torch.full_like(x, float("nan"))
    assert with_out(name, x, gs, out) is out
    assert torch.equal(out, expected)
    # the raw overload mutates out and returns nothing
    out2 = torch.empty_like(x)
    assert getattr(torch.ops.ater_ext, name).out(x, *gs, *SCALES[name], out=out2) is None
    assert torch.equal(out2, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OUT_OPS)
def test_out_may_be_x(name, dtype, device):
    x, gs = step_inputs(name, (5, 3, 41), dtype, device)
    expected = call(ops, name, x.clone(), gs, SCALES[name])[0]
    assert with_out(name, x, gs, x) is x
    assert torch.equal(x, expected)


BAD_OUT = ["shape", "numel-shape", "dtype", "non-contiguous", "expanded", "partial-overlap-x"]


def bad_buffer(kind, base):
    """A wrong out= buffer for x = base[:4] (shape [4, 3], fp32)."""
    return {
        "shape": lambda: torch.empty(4, 5),
        "numel-shape": lambda: torch.empty(12),
        "dtype": lambda: torch.empty(4, 3, dtype=torch.float64),
        "non-contiguous": lambda: torch.empty(3, 4).t(),
        "expanded": lambda: torch.empty(1, 3).expand(4, 3),
        "partial-overlap-x": lambda: base[1:],
    }[kind]()


@pytest.mark.parametrize("name", OUT_OPS)
@pytest.mark.parametrize("kind", BAD_OUT)
def test_bad_out_rejected(kind, name):
    base = torch.randn(5, 3)
    x = base[:4]
    gs = [torch.randn(4, 3) for _ in range(2 if name == "fd_direction" else 1)]
    with pytest.raises(RuntimeError, match=rf"(?<!\w){name}(?!\w)"):
        with_out(name, x, gs, bad_buffer(kind, base))


@requires_cuda
@pytest.mark.parametrize("name", OUT_OPS)
def test_out_on_another_device_rejected(name):
    x, gs = step_inputs(name, (4, 3), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=rf"(?<!\w){name}(?!\w)"):
        with_out(name, x, gs, torch.empty(4, 3, device="cuda"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", OUT_OPS)
def test_out_opcheck(name, dtype, device):
    x, gs = step_inputs(name, (4, 3, 5), dtype, device)
    gs[-1][1] = 0
    out = torch.empty_like(x)
    torch.library.opcheck(getattr(torch.ops.ater_ext, name).out, (x, *gs, *SCALES[name]), {"out": out})


@pytest.mark.parametrize("name", OUT_OPS)
def test_out_meta(name):
    x = torch.empty(4, 3, 5, device="meta")
    gs = [torch.empty_like(x) for _ in range(2 if name == "fd_direction" else 1)]
    out = torch.empty_like(x)
    assert with_out(name, x, gs, out) is out


@pytest.mark.parametrize("device", DEVICES)
def test_out_under_torch_compile(device, dynamo_reset):
    def step(x, g, g1, buf):
        ops.normalized_step(x, g, 0.5, out=buf)
        return ops.fd_direction(buf, g, g1, 2.0, out=x)  # in place into x

    x, g, g1 = (make((6, 10), torch.float32, device) for _ in range(3))
    x_e, buf_e = x.clone(), torch.empty_like(x)
    expected = step(x_e, g, g1, buf_e)
    x_c, buf_c = x.clone(), torch.empty_like(x)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x_c, g, g1, buf_c)
    assert torch.equal(got, expected) and torch.equal(x_c, x_e) and torch.equal(buf_c, buf_e)


# ------------------------------------------- autograd: as PyTorch's own out=
def _after_op_name(message: str) -> str:
    """The text after "<op>(): " (PyTorch's and ours name different ops)."""
    assert "(): " in message, message
    return message.split("(): ", 1)[1]


def _torch_add_error(who: str, device) -> str:
    """PyTorch's own message for torch.add(a, b, out=o) with ``who`` requiring grad."""
    a, b, o = (torch.randn(5, 7, device=device) for _ in range(3))
    {"x": a, "g": b, "out": o}[who].requires_grad_()
    with pytest.raises(RuntimeError) as err:
        torch.add(a, b, out=o)
    return str(err.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("who", ["x", "g", "out"])
@pytest.mark.parametrize("name", OUT_OPS)
def test_out_refused_when_autograd_would_need_it(name, who, device):
    x, gs = step_inputs(name, (5, 7), torch.float32, device)
    out = torch.full_like(x, float("nan"))
    {"x": x, "g": gs[-1], "out": out}[who].requires_grad_()
    with pytest.raises(RuntimeError) as err:
        with_out(name, x, gs, out)
    ours = str(err.value)
    assert ours.startswith(f"ater_ext::{name}(): "), ours
    assert _after_op_name(ours) == _after_op_name(_torch_add_error(who, device))
    assert out.isnan().all(), "a refused call wrote into out"
    assert out._version == 0


@pytest.mark.parametrize("name", OUT_OPS)
def test_out_into_a_non_leaf_refused(name):
    """The issue's case: b = a.exp() requires grad, so out=b is refused (PyTorch: the same)."""
    a = torch.randn(4, 6, requires_grad=True)
    b = a.exp()
    gs = [torch.randn(4, 6) for _ in range(2 if name == "fd_direction" else 1)]
    with pytest.raises(RuntimeError, match="don't support automatic differentiation"):
        with_out(name, b, gs, b)
    with pytest.raises(RuntimeError, match="don't support automatic differentiation"):
        torch.add(b, gs[0], out=b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OUT_OPS)
def test_out_allowed_under_no_grad_and_bumps_version(name, device):
    """Under no_grad, out= into tensors that require grad is allowed (as torch.add's); the
    version counter moves by as much as torch.add(..., out=) moves it."""
    x, gs = step_inputs(name, (5, 7), torch.float32, device)
    expected = call(ops, name, x, gs, SCALES[name])[0]
    out = torch.empty_like(x).requires_grad_()
    a, b, o = torch.randn(5, 7), torch.randn(5, 7), torch.empty(5, 7, requires_grad=True)
    with torch.no_grad():
        v, vo = out._version, o._version
        with_out(name, x, gs, out)
        torch.add(a, b, out=o)
    assert torch.equal(out.detach(), expected)
    assert out._version - v == o._version - vo == 1
    out2 = torch.empty_like(x)  # grad mode on, nothing requires grad
    with_out(name, x, gs, out2)
    assert out2._version == 1


def _torch_inplace_error(run) -> str:
    with pytest.raises(RuntimeError) as err:
        run()
    return str(err.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OUT_OPS)
def test_out_into_saved_tensor_makes_backward_raise(name, device):
    """A graph saved c (w * c saves c); writing into c through out= makes backward raise
    PyTorch's "modified by an inplace operation", as torch.add(..., out=c) does."""
    def scenario(write):
        w = torch.randn(5, 7, device=device, requires_grad=True)
        c = torch.randn(5, 7, device=device)
        y = (w * c).sum()
        write(c)
        return _torch_inplace_error(y.backward)

    x, gs = step_inputs(name, (5, 7), torch.float32, device)
    ours = scenario(lambda c: with_out(name, x, gs, c))
    theirs = scenario(lambda c: torch.add(x, x, out=c))
    assert "modified by an inplace operation" in ours and "modified by an inplace operation" in theirs
    # same message up to the name of the modifying op's node and the versions (same numbers too)
    assert ours.split("[")[0] == theirs.split("[")[0]
    assert ours.split("]", 1)[1] == theirs.split("]", 1)[1]


@pytest.mark.parametrize("name", OUT_OPS)
def test_out_into_saved_result_under_no_grad(name):
    """The issue's case under no_grad: b = a.exp() saves its result b; rewriting b through
    out= must make backward raise instead of using the new values."""
    def scenario(write):
        a = torch.randn(4, 6, requires_grad=True)
        b = a.exp()
        with torch.no_grad():
            write(b)
        return _torch_inplace_error(lambda: b.sum().backward())

    gs = [torch.randn(4, 6) for _ in range(2 if name == "fd_direction" else 1)]
    ours = scenario(lambda b: with_out(name, b, gs, b))
    theirs = scenario(lambda b: torch.add(b, gs[0], out=b))
    assert "modified by an inplace operation" in ours and "modified by an inplace operation" in theirs


@pytest.mark.parametrize("name", OUT_OPS)
def test_out_refuses_forward_ad(name):
    import torch.autograd.forward_ad as fwAD

    x, gs = step_inputs(name, (3, 4), torch.float64, "cpu")
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match=rf"forward AD with ater_ext::{name}\.out"):
            with_out(name, dual, gs, torch.empty_like(x))
