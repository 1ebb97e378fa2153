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
