"""Bad input raises a RuntimeError that names the op (and, for shape
mismatches, the shapes it saw), through the typed wrappers and the raw ops."""
from __future__ import annotations

import re

import pytest
import torch

from _ops_common import requires_cuda
from ater_ext import ops


def op_pattern(name: str, *fragments: str) -> str:
    """Regex: the op name as a whole word (so normalized_step does not match
    dual_normalized_step), then each fragment, in order."""
    return rf"(?<!\w){name}(?!\w)" + "".join(".*" + re.escape(f) for f in fragments)


def f32(*shape, device="cpu"):
    return torch.randn(shape, device=device)


def of(dtype, *shape):
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    return torch.ones(shape, dtype=dtype)


API = {
    "wrapper": lambda name: getattr(ops, name),
    "raw": lambda name: getattr(torch.ops.ater_ext, name),
}
BAD_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.complex128]
BAD_SCALARS = [0.0, -1.0, -1e-30, float("inf"), float("-inf"), float("nan")]


# -------------------------------------------------------------- step ops
def step_cases():
    """(op, args, regex fragments)."""
    cases = []
    for name, scales in [("normalized_step", (0.5,)), ("dual_normalized_step", (0.5, 2.0))]:
        cases += [
            pytest.param(name, (f32(4, 3), f32(4, 5), *scales), ("[4, 3]", "[4, 5]"), id=f"{name}-shape"),
            pytest.param(name, (f32(4, 3), f32(5, 3), *scales), ("[4, 3]", "[5, 3]"), id=f"{name}-rows"),
            pytest.param(name, (f32(4, 3), f32(12), *scales), ("[4, 3]", "[12]"), id=f"{name}-same-numel"),
            pytest.param(name, (f32(4, 3), f32(4, 3).double(), *scales), (), id=f"{name}-dtype"),
            pytest.param(name, (f32(4, 3).half(), f32(4, 3).bfloat16(), *scales), (), id=f"{name}-dtype-reduced"),
            pytest.param(name, (torch.tensor(1.0), torch.tensor(2.0), *scales), (), id=f"{name}-0d"),
            pytest.param(name, (f32(4, 3), torch.tensor(2.0), *scales), (), id=f"{name}-0d-g"),
        ]
        for dt in BAD_DTYPES:
            cases.append(pytest.param(name, (of(dt, 4, 3), of(dt, 4, 3), *scales), (), id=f"{name}-{dt}"))
            cases.append(pytest.param(name, (f32(4, 3), of(dt, 4, 3), *scales), (), id=f"{name}-g-{dt}"))
        for i in range(len(scales)):
            for bad in BAD_SCALARS:
                s = list(scales)
                s[i] = bad
                cases.append(pytest.param(name, (f32(4, 3), f32(4, 3), *s), (), id=f"{name}-scale{i}={bad}"))
    name = "fd_direction"
    cases += [
        pytest.param(name, (f32(4, 3), f32(4, 5), f32(4, 5), 1.0), ("[4, 3]", "[4, 5]"), id="fd-shape-x-g0"),
        pytest.param(name, (f32(4, 3), f32(4, 3), f32(4, 5), 1.0), ("[4, 3]", "[4, 5]"), id="fd-shape-g0-g1"),
        pytest.param(name, (f32(4, 3), f32(4, 3), f32(2, 3), 1.0), ("[4, 3]", "[2, 3]"), id="fd-rows-g1"),
        pytest.param(name, (f32(4, 3), f32(4, 3), f32(4, 3).double(), 1.0), (), id="fd-dtype-g1"),
        pytest.param(name, (f32(4, 3).double(), f32(4, 3), f32(4, 3), 1.0), (), id="fd-dtype-x"),
        pytest.param(name, (torch.tensor(1.0), torch.tensor(1.0), torch.tensor(2.0), 1.0), (), id="fd-0d"),
    ]
    for dt in BAD_DTYPES:
        cases.append(pytest.param(name, (of(dt, 4, 3), of(dt, 4, 3), of(dt, 4, 3), 1.0), (), id=f"fd-{dt}"))
        cases.append(pytest.param(name, (f32(4, 3), f32(4, 3), of(dt, 4, 3), 1.0), (), id=f"fd-g1-{dt}"))
    for bad in BAD_SCALARS:
        cases.append(pytest.param(name, (f32(4, 3), f32(4, 3), f32(4, 3), bad), (), id=f"fd-eps={bad}"))
    name = "fd_sphere_step"
    ok = (f32(4, 3), f32(4, 3), f32(4, 3), f32(4, 3))
    for i, arg in enumerate(("x", "z", "g0", "g1")):
        for bad, frag, tag in [(f32(4, 5), ("[4, 5]",), "shape"), (f32(2, 3), ("[2, 3]",), "rows"),
                               (f32(4, 3).double(), ("Double",), "dtype"), (torch.tensor(1.0), (arg,), "0d")]:
            args = list(ok)
            args[i] = bad
            cases.append(pytest.param(name, (*args, 1.5, 2.0), frag, id=f"sphere-{arg}-{tag}"))
        for dt in BAD_DTYPES:
            args = list(ok)
            args[i] = of(dt, 4, 3)
            cases.append(pytest.param(name, (*args, 1.5, 2.0), (arg,), id=f"sphere-{arg}-{dt}"))
    for bad in BAD_SCALARS:
        cases.append(pytest.param(name, (*ok, bad, 2.0), ("step",), id=f"sphere-step={bad}"))
        cases.append(pytest.param(name, (*ok, 1.5, bad), ("eps",), id=f"sphere-eps={bad}"))
    return cases


@pytest.mark.parametrize("api", list(API))
@pytest.mark.parametrize("name,args,fragments", step_cases())
def test_step_ops_reject_bad_input(name, args, fragments, api):
    with pytest.raises(RuntimeError, match=op_pattern(name, *fragments)):
        API[api](name)(*args)


@pytest.mark.parametrize("api", list(API))
@pytest.mark.parametrize("name", ["normalized_step", "dual_normalized_step", "fd_direction", "fd_sphere_step"])
def test_bad_scalar_rejected_even_for_empty_input(name, api):
    x = torch.empty(0, 3)
    n_tensors = {"fd_direction": 3, "fd_sphere_step": 4}.get(name, 2)
    scales = (float("nan"), 1.0) if name in ("dual_normalized_step", "fd_sphere_step") else (float("nan"),)
    with pytest.raises(RuntimeError, match=op_pattern(name)):
        API[api](name)(*([x] * n_tensors), *scales)


# -------------------------------------------------------------- row_norm
@pytest.mark.parametrize("api", list(API))
@pytest.mark.parametrize(
    "g", [pytest.param(of(dt, 4, 3), id=str(dt)) for dt in BAD_DTYPES] + [pytest.param(torch.tensor(3.0), id="0d")]
)
def test_row_norm_rejects_bad_input(g, api):
    with pytest.raises(RuntimeError, match=op_pattern("row_norm")):
        API[api]("row_norm")(g)


# ------------------------------------------------------ row_norm_backward
@pytest.mark.parametrize(
    "args",
    [
        pytest.param((f32(5), f32(4, 3), f32(4)), id="grad-rows"),
        pytest.param((f32(4), f32(4, 3), f32(3)), id="norm-rows"),
        pytest.param((f32(4, 1), f32(4, 3), f32(4)), id="grad-2d"),
        pytest.param((f32(4), f32(4, 3), f32(4, 3)), id="norm-2d"),
        pytest.param((torch.tensor(1.0), f32(4, 3), f32(4)), id="grad-0d"),
        pytest.param((f32(4), torch.tensor(1.0), f32(4)), id="g-0d"),
        pytest.param((f32(4).double(), f32(4, 3), f32(4)), id="grad-dtype"),
        pytest.param((f32(4), f32(4, 3), f32(4).half()), id="norm-dtype"),
        pytest.param((of(torch.int64, 4), of(torch.int64, 4, 3), of(torch.int64, 4)), id="int"),
        pytest.param((f32(4), of(torch.complex64, 4, 3), f32(4)), id="complex-g"),
    ],
)
def test_row_norm_backward_rejects_bad_input(args):
    with pytest.raises(RuntimeError, match=op_pattern("row_norm_backward")):
        torch.ops.ater_ext.row_norm_backward(*args)


def test_row_norm_backward_message_shows_shapes():
    with pytest.raises(RuntimeError, match=op_pattern("row_norm_backward", "[4, 3]", "[5]", "[4]")):
        torch.ops.ater_ext.row_norm_backward(f32(5), f32(4, 3), f32(4))


# ------------------------------------------------------------ meta / fake
@pytest.mark.parametrize(
    "name,args",
    [
        pytest.param("normalized_step", lambda m: (m(4, 3), m(4, 5), 0.5), id="normalized_step"),
        pytest.param("dual_normalized_step", lambda m: (m(4, 3), m(5, 3), 0.5, 2.0), id="dual"),
        pytest.param("fd_direction", lambda m: (m(4, 3), m(4, 3), m(4, 5), 1.0), id="fd_direction"),
        pytest.param("fd_sphere_step", lambda m: (m(4, 3), m(4, 5), m(4, 3), m(4, 3), 1.5, 2.0), id="fd_sphere_step"),
        pytest.param("row_norm", lambda m: (torch.empty((), device="meta"),), id="row_norm-0d"),
    ],
)
def test_meta_rejects_mismatched_shapes(name, args):
    def m(*shape):
        return torch.empty(shape, device="meta")

    with pytest.raises(RuntimeError, match=op_pattern(name)):
        getattr(ops, name)(*args(m))


# ----------------------------------------------------------------- devices
@requires_cuda
@pytest.mark.parametrize("api", list(API))
@pytest.mark.parametrize("name", ["normalized_step", "dual_normalized_step", "fd_direction", "fd_sphere_step",
                                  "row_norm_backward"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_mixed_devices_rejected(name, where, api):
    cpu, cuda = f32(4, 3), f32(4, 3, device="cuda")
    first, last = (cpu, cuda) if where == "first" else (cuda, cpu)
    if name == "fd_direction":
        args = (first, last, last, 1.0)
    elif name == "fd_sphere_step":
        args = (first, first, first, last, 1.5, 2.0)
    elif name == "row_norm_backward":
        if api == "wrapper":
            pytest.skip("row_norm_backward has no wrapper")
        args = (f32(4, device=first.device.type), last, f32(4, device=first.device.type))
    else:
        args = (first, last, 0.5) + ((2.0,) if name == "dual_normalized_step" else ())
    with pytest.raises(RuntimeError, match=op_pattern(name)):
        API[api](name)(*args)


# ------------------------------------- meta / fake refuse what the real refuse
def _to(device, args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _row_norm_backward_cases():
    return [pytest.param("row_norm_backward", args, (), id=f"rnb-{i}") for i, args in enumerate([
        (f32(5), f32(4, 3), f32(4)), (f32(4), f32(4, 3), f32(3)), (f32(4, 1), f32(4, 3), f32(4)),
        (torch.tensor(1.0), f32(4, 3), f32(4)), (f32(4).double(), f32(4, 3), f32(4)),
        (of(torch.int64, 4), of(torch.int64, 4, 3), of(torch.int64, 4)),
    ])]


def _row_norm_cases():
    return [pytest.param("row_norm", (of(dt, 4, 3),), (), id=f"row_norm-{dt}") for dt in BAD_DTYPES]


META_CASES = step_cases() + _row_norm_cases() + _row_norm_backward_cases()


@pytest.mark.parametrize("name,args,fragments", META_CASES)
def test_meta_refuses_what_cpu_refuses(name, args, fragments):
    """Every bad call of the CPU tests, on meta tensors: the same error (the Meta
    kernels share csrc/checks.h with the real ones)."""
    op = getattr(torch.ops.ater_ext, name)
    with pytest.raises(RuntimeError) as cpu_err:
        op(*args)
    with pytest.raises(RuntimeError, match=op_pattern(name, *fragments)) as meta_err:
        op(*_to("meta", args))
    assert str(meta_err.value).split("\n")[0].replace("meta", "cpu") == str(cpu_err.value).split("\n")[0]


@pytest.mark.parametrize("name,args,fragments", META_CASES)
def test_fake_tensors_refuse_what_cpu_refuses(name, args, fragments):
    """The same under FakeTensorMode, which torch.compile traces with."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        with pytest.raises(RuntimeError, match=op_pattern(name, *fragments)):
            getattr(torch.ops.ater_ext, name)(*fake)


def _mixed_device_calls():
    """(name, call(cpu_tensor_maker, other_maker)): one argument on another device."""
    return {
        "normalized_step": lambda a, b: torch.ops.ater_ext.normalized_step(a(4, 3), b(4, 3), 0.5),
        "normalized_step.out": lambda a, b: torch.ops.ater_ext.normalized_step.out(a(4, 3), a(4, 3), 0.5, out=b(4, 3)),
        "dual_normalized_step": lambda a, b: torch.ops.ater_ext.dual_normalized_step(a(4, 3), b(4, 3), 0.5, 2.0),
        "fd_direction": lambda a, b: torch.ops.ater_ext.fd_direction(a(4, 3), a(4, 3), b(4, 3), 1.0),
        "fd_direction.out": lambda a, b: torch.ops.ater_ext.fd_direction.out(a(4, 3), a(4, 3), a(4, 3), 1.0,
                                                                              out=b(4, 3)),
        "fd_sphere_step": lambda a, b: torch.ops.ater_ext.fd_sphere_step(a(4, 3), b(4, 3), a(4, 3), a(4, 3), 1.5,
                                                                          2.0),
        "row_norm_backward-g": lambda a, b: torch.ops.ater_ext.row_norm_backward(a(4), b(4, 3), a(4)),
        "row_norm_backward-grad": lambda a, b: torch.ops.ater_ext.row_norm_backward(b(4), a(4, 3), a(4)),
    }


@pytest.mark.parametrize("order", ["cpu-first", "meta-first"])
@pytest.mark.parametrize("case", list(_mixed_device_calls()))
def test_cpu_and_meta_mixed_is_refused(case, order):
    """A CPU + meta call dispatches to the Meta kernel, which must refuse it (it used to return
    uninitialised CPU memory), naming the op and both devices."""
    cpu = lambda *s: torch.randn(s)  # noqa: E731
    meta = lambda *s: torch.empty(s, device="meta")  # noqa: E731
    a, b = (cpu, meta) if order == "cpu-first" else (meta, cpu)
    name = case.split("-")[0].split(".")[0]
    with pytest.raises(RuntimeError, match=op_pattern(name, "same device")):
        _mixed_device_calls()[case](a, b)


@pytest.mark.parametrize("kind", ["shape", "dtype", "non-contiguous", "expanded", "partial-overlap-x"])
@pytest.mark.parametrize("name", ["normalized_step", "fd_direction"])
def test_meta_out_refuses_bad_buffers(name, kind):
    base = torch.empty(5, 3, device="meta")
    x = base[:4]
    out = {"shape": lambda: torch.empty(4, 5, device="meta"),
           "dtype": lambda: torch.empty(4, 3, dtype=torch.float64, device="meta"),
           "non-contiguous": lambda: torch.empty(3, 4, device="meta").t(),
           "expanded": lambda: torch.empty(1, 3, device="meta").expand(4, 3),
           "partial-overlap-x": lambda: base[1:]}[kind]()
    gs = [torch.empty(4, 3, device="meta") for _ in range(2 if name == "fd_direction" else 1)]
    with pytest.raises(RuntimeError, match=op_pattern(name)):
        getattr(ops, name)(x, *gs, 1.0, out=out)
