"""The CUDA kernels against the CPU kernels, in both kernel layouts ("rows", the
default, and "adaptive"; see ater_ext.ops.set_cuda_layout): every path boundary
of the launch configuration in all four dtypes, misaligned views, grid-stride
shapes, rows of extreme scale, int64 indexing, out= aliasing, determinism,
non-default streams and CUDA-graph capture (ops, TrainStep, compiled passes).

Each CUDA result is compared with the CPU kernel's on the same values: both
accumulate in fp32 (fp64 for fp64) and round once, so they agree to a few ulps
of the accumulation type plus one ulp of the output type (the tolerances of
_ops_common); NaN where the CPU has NaN, inf where it has inf.

Without CUDA only the layout switch's own tests run; the rest skip.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from _ops_common import (
    DTYPES,
    SCALES,
    STEP_OPS,
    assert_norm_close,
    assert_norm_matches_truth,
    assert_step_close,
    call,
    make,
    requires_cuda,
    step_inputs,
)
from ater_ext import ops

LAYOUTS = list(ops.CUDA_LAYOUTS)

# Launch-path boundaries of the two layouts: warp rows up to D = 1024, the
# vector width (4 fp32, 2 fp64, 8 fp16/bf16) dividing D or not, block sizes at
# D = 4096 / 16384, rows split over blocks from D = 16384 at small B, D = 1.
BOUNDARY_SHAPES = [(33, 1024), (33, 1025), (33, 1032), (3, 4096), (3, 4097), (2, 16385), (2, 70001), (2, 1)]
TINY_SHAPES = [(1000, 3), (777, 4), (513, 8), (300, 17), (64, 64)]  # several rows per warp


@pytest.fixture(params=LAYOUTS)
def layout(request):
    """Runs the test under each CUDA kernel layout, restoring the previous one."""
    with ops.cuda_layout(request.param):
        yield request.param


# -------------------------------------------------------------- the switch
def test_layout_switch_default_and_errors():
    assert ops.get_cuda_layout() == "rows"
    with ops.cuda_layout("adaptive"):
        assert ops.get_cuda_layout() == "adaptive"
    assert ops.get_cuda_layout() == "rows"
    with pytest.raises(ValueError, match=r"set_cuda_layout: layout must be one of \['rows', 'adaptive'\], got 'tiled'"):
        ops.set_cuda_layout("tiled")
    assert ops.get_cuda_layout() == "rows"


def _import_with_layout(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATER_EXT_CUDA_LAYOUT": value}
    return subprocess.run([sys.executable, "-c", "from ater_ext import ops; print(ops.get_cuda_layout())"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_layout_from_environment():
    done = _import_with_layout("adaptive")
    assert done.returncode == 0 and done.stdout.strip() == "adaptive", done.stderr
    bad = _import_with_layout("fast")
    assert bad.returncode != 0
    assert "ATER_EXT_CUDA_LAYOUT must be 'rows' or 'adaptive', got 'fast'" in bad.stderr


def test_cpu_kernels_ignore_the_layout():
    x, (g,) = step_inputs("normalized_step", (5, 37), torch.float32, "cpu")
    want = ops.normalized_step(x, g, 0.5)
    with ops.cuda_layout("adaptive"):
        assert torch.equal(ops.normalized_step(x, g, 0.5), want)


# ------------------------------------------------------------------ helpers
def assert_matches_cpu(name, x, gs, scales, what=""):
    """The op on CUDA equals the CPU kernel on the same values (NaN / inf rows alike)."""
    cpu_outs = call(ops, name, x.cpu(), [t.cpu() for t in gs], scales)
    outs = call(ops, name, x, gs, scales)
    for k, (out, want, s) in enumerate(zip(outs, cpu_outs, scales[-len(outs):])):  # fd_sphere_step: eps
        label = f"{what} {name} output {k}"
        assert out.is_cuda and out.shape == want.shape and out.dtype == want.dtype and out.is_contiguous(), label
        got = out.cpu()
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), f"{label}: NaN pattern differs from the CPU kernel"
        assert_step_close(got[~nan], want[~nan], x.cpu()[~nan], s, what=label)


def assert_norm_matches_cpu(g, what=""):
    got, want = ops.row_norm(g).cpu(), ops.row_norm(g.cpu())
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN pattern of row_norm differs from the CPU kernel"
    assert_norm_close(got[~nan], want[~nan], what=f"{what} row_norm")


def assert_backward_matches_cpu(g, what=""):
    grad = make((g.shape[0],), g.dtype, g.device)
    norm = ops.row_norm(g.cpu()).to(g.device)
    got = torch.ops.ater_ext.row_norm_backward(grad, g, norm).cpu()
    want = torch.ops.ater_ext.row_norm_backward(grad.cpu(), g.cpu(), norm.cpu())
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), what
    assert_step_close(got[~nan], want[~nan], want[~nan], 1.0, what=f"{what} row_norm_backward")


# ------------------------------------------------------------ path boundaries
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BOUNDARY_SHAPES + TINY_SHAPES, ids=str)
def test_path_boundaries_match_cpu(shape, dtype, layout):
    for name in STEP_OPS:
        x, gs = step_inputs(name, shape, dtype, "cuda")
        if shape[0] > 2:
            gs[-1][1] = 0  # a zero (difference) row
        assert_matches_cpu(name, x, gs, SCALES[name], what=f"{layout} {shape}")
    g = make(shape, dtype, "cuda")
    assert_norm_matches_cpu(g, what=f"{layout} {shape}")
    assert_backward_matches_cpu(g, what=f"{layout} {shape}")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(67587, 64), (2000000, 8)], ids=str)
def test_grid_stride_shapes_match_cpu(shape, dtype, layout):
    """More rows than the capped grid: every row is still visited once."""
    if shape == (2000000, 8) and dtype not in (torch.bfloat16, torch.float32):
        pytest.skip("[2000000, 8] in bf16 and fp32 only (time)")
    x, (g,) = step_inputs("normalized_step", shape, dtype, "cuda")
    assert_matches_cpu("normalized_step", x, (g,), (0.75,), what=f"{layout} {shape}")
    x, gs = step_inputs("fd_direction", shape, dtype, "cuda")
    assert_matches_cpu("fd_direction", x, gs, (2.0,), what=f"{layout} {shape}")
    assert_norm_matches_cpu(g, what=f"{layout} {shape}")


# ---------------------------------------------------------------- misaligned
def offset_view(t: torch.Tensor, elements: int) -> torch.Tensor:
    """A contiguous copy of t whose data starts ``elements`` past an allocation's start."""
    flat = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    view = flat[elements:].view(t.shape)
    view.copy_(t)
    return view


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9, 64), (5, 1031), (3, 4096), (2, 70001)], ids=str)
@pytest.mark.parametrize("which", ["x", "g", "out", "all-same", "all-different"])
def test_misaligned_views_match_cpu(which, shape, dtype, layout):
    """Views one element past a 16-byte boundary (and, for all-different, at different residues)."""
    offsets = {"x": (1, 0, 0), "g": (0, 1, 0), "out": (0, 0, 1), "all-same": (1, 1, 1),
               "all-different": (1, 2, 3)}[which]
    x, (g0, g1) = step_inputs("fd_direction", shape, dtype, "cuda")
    ox, og = offset_view(x, offsets[0]), offset_view(g1, offsets[1])
    og0 = offset_view(g0, offsets[1])
    for t in (ox, og, og0):
        assert t.is_contiguous()
    want = ops.normalized_step(x.cpu(), g1.cpu(), 0.75)
    out = offset_view(torch.full_like(x, float("nan")), offsets[2])
    ops.normalized_step(ox, og, 0.75, out=out)
    assert_step_close(out.cpu(), want, x.cpu(), 0.75, what=f"{layout} normalized_step {which}")
    want = ops.fd_direction(x.cpu(), g0.cpu(), g1.cpu(), 2.0)
    out = offset_view(torch.full_like(x, float("nan")), offsets[2])
    ops.fd_direction(ox, og0, og, 2.0, out=out)
    assert_step_close(out.cpu(), want, x.cpu(), 2.0, what=f"{layout} fd_direction {which}")
    assert_matches_cpu("dual_normalized_step", ox, (og,), (0.75, 3.0), what=f"{layout} {which}")
    assert_norm_matches_cpu(og, what=f"{layout} {which}")
    assert_backward_matches_cpu(og, what=f"{layout} {which}")


# ------------------------------------------------------------- extreme rows
def extreme_rows(d: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows at 1e-30, 1e30, subnormal, zero, with a NaN, with an inf, and ordinary ones."""
    info = torch.finfo(dtype)
    base = torch.randn(8, d, dtype=torch.float64)
    rows = [base[0] * 1e-30, base[1] * 1e30, base[2].sign() * info.smallest_normal * info.eps * 3,
            torch.zeros(d, dtype=torch.float64), base[4].clone(), base[5].clone(), base[6], base[7] * 1e3]
    rows[4][d // 2] = float("nan")
    rows[5][d - 1] = float("inf")
    return torch.stack(rows).to(dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [257, 1031, 4096, 70001], ids=lambda d: f"D={d}")
def test_extreme_rows_match_cpu(d, dtype, layout):
    g = extreme_rows(d, dtype).cuda()
    x = make(g.shape, dtype, "cuda")
    for name, gs, scales in [("normalized_step", (g,), (0.75,)), ("dual_normalized_step", (g,), (0.75, 3.0)),
                             ("fd_direction", (torch.zeros_like(g), g), (2.0,))]:
        assert_matches_cpu(name, x, gs, scales, what=f"{layout} D={d}")
    assert_norm_matches_cpu(g, what=f"{layout} D={d}")
    n = ops.row_norm(g)
    if dtype != torch.float16:  # 1e30 overflows fp16 to inf anyway
        assert bool(n[5].isposinf()) and bool(n[4].isnan())


@requires_cuda
@pytest.mark.parametrize("rows", [1, 3], ids=lambda b: f"B={b}")
def test_single_long_row_split_matches_cpu(rows, layout):
    """[1, 1e7]-like rows: the adaptive layout splits them over many blocks."""
    x, gs = step_inputs("fd_direction", (rows, 10_000_003), torch.float32, "cuda")
    assert_matches_cpu("fd_direction", x, gs, (2.0,), what=f"{layout} long row")
    gs[-1][0, 5] = float("inf")
    n = ops.row_norm(gs[-1])
    assert bool(n[0].isposinf())
    # against the float64 truth: the CPU kernel's own fp32 sums of 1e7 squares carry ~1e-5 error
    assert_norm_matches_truth(n, gs[-1], what=f"{layout} long rows")


# -------------------------------------------------------------- int64 index
@requires_cuda
def test_int64_indexing(layout):
    """[1, 2^31 + 64] fp16: flat indices past 2^31 must be reached (int32 would wrap)."""
    d = 2**31 + 64
    need = 4 * d * 2 + (1 << 30)  # x, g, out, row_norm's read, plus slack
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    g = torch.ones(1, d, dtype=torch.float16, device="cuda")
    x = torch.zeros_like(g)
    out = torch.full_like(g, float("nan"))
    ops.normalized_step(x, g, 1.0, out=out)
    expected = torch.tensor(d ** -0.5, dtype=torch.float16).item()
    for part in (out[0, :256], out[0, 2**31 - 128: 2**31 + 64], out[0, -256:]):
        assert bool((part == expected).all()), f"{layout}: wrong or unwritten values near the int32 limit"
    torch.testing.assert_close(ops.row_norm(g).float().cpu(), torch.tensor([d ** 0.5]), rtol=2e-3, atol=0)
    del g, x, out
    torch.cuda.empty_cache()


# -------------------------------------------------------------- out= aliases
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33, 1032), (2, 70001), (513, 8)], ids=str)
@pytest.mark.parametrize("alias", ["x", "g", "g0", "g1"])
def test_out_aliasing_an_input(alias, shape, dtype, layout):
    name = "normalized_step" if alias in ("x", "g") else "fd_direction"
    x, gs = step_inputs(name, shape, dtype, "cuda")
    x_cpu = x.cpu()
    want = call(ops, name, x_cpu, [t.cpu() for t in gs], SCALES[name])[0]
    target = {"x": x, "g": gs[0], "g0": gs[0], "g1": gs[-1]}[alias]
    getattr(ops, name)(x, *gs, *SCALES[name], out=target)
    assert_step_close(target.cpu(), want, x_cpu, SCALES[name][0], what=f"{layout} out={alias}")


# ----------------------------------------------------------- determinism
@requires_cuda
@pytest.mark.parametrize("shape", [(33, 1025), (2, 70001), (1, 1_000_003), (4096, 4)], ids=str)
def test_bitwise_deterministic_over_repeats(shape, layout):
    x, gs = step_inputs("fd_direction", shape, torch.float32, "cuda")
    first = [ops.fd_direction(x, *gs, 2.0), ops.row_norm(gs[1]), *ops.dual_normalized_step(x, gs[1], 0.5, 3.0)]
    for _ in range(5):
        again = [ops.fd_direction(x, *gs, 2.0), ops.row_norm(gs[1]), *ops.dual_normalized_step(x, gs[1], 0.5, 3.0)]
        assert all(torch.equal(a, b) for a, b in zip(first, again)), f"{layout} {shape}: results vary"


# --------------------------------------------------------------- streams
@requires_cuda
@pytest.mark.parametrize("name", STEP_OPS + ("row_norm",))
def test_runs_on_the_current_stream(name, layout):
    """On a side stream that is still busy (a sleep, then the input written), the op
    must wait for the write: it launches on the current stream, not the default one."""
    shape = (64, 4099)
    x, gs = step_inputs(name if name != "row_norm" else "normalized_step", shape, torch.float32, "cuda")
    new = [make(shape, torch.float32, "cuda") for _ in gs]
    args = (gs[0],) if name == "row_norm" else (x, *gs, *SCALES[name])
    want = getattr(ops, name)(*((new[0],) if name == "row_norm" else (x, *new, *SCALES[name])))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        for t, n in zip(gs, new):
            t.copy_(n)
        got = getattr(ops, name)(*args)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(a, b), f"{layout} {name}: ran before the side stream's write"


# --------------------------------------------------------------- CUDA graphs
@requires_cuda
@pytest.mark.parametrize("out", [False, True], ids=["functional", "out="])
@pytest.mark.parametrize("name", STEP_OPS + ("row_norm", "row_norm_backward"))
@pytest.mark.parametrize("shape", [(33, 1025), (2, 70001), (513, 8)], ids=str)
def test_capture_each_op(shape, name, out, layout):
    """Captured with capture_error_mode="global" (any unsafe CUDA call in any thread
    fails the capture), replayed on new input values: equal to eager calls."""
    if out and name not in ("normalized_step", "fd_direction"):
        pytest.skip("no out= overload")
    n_in = {"normalized_step": 2, "dual_normalized_step": 2, "fd_direction": 3, "fd_sphere_step": 4, "row_norm": 1,
            "row_norm_backward": 3}[name]

    def inputs():
        ts = [make(shape, torch.float32, "cuda") for _ in range(n_in)]
        if name == "row_norm_backward":
            ts = [ts[0][:, 0].contiguous(), ts[1], ts[2].abs()[:, 0].contiguous() + 1]
        return ts

    op = getattr(torch.ops.ater_ext, name)
    scalars = SCALES.get(name, ())
    static = inputs()
    buf = torch.empty(shape, device="cuda")

    def run():
        if out:
            op.out(*static, *scalars, out=buf)
            return (buf,)
        r = op(*static, *scalars)
        return r if isinstance(r, tuple) else (r,)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="global"):
        captured = run()
    for _ in range(2):
        fresh = inputs()
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        want = op(*fresh, *scalars)
        want = want if isinstance(want, tuple) else (want,)
        for a, b in zip(captured, want):
            assert torch.equal(a, b), f"{layout} {name}: replay differs from an eager call"


def _bn_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 64), torch.nn.BatchNorm1d(64),
                               torch.nn.Tanh(), torch.nn.Linear(64, 10)).double().cuda()


def _batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.rand(32, 3, 4, 4, generator=gen, dtype=torch.float64).cuda(),
             torch.randint(0, 10, (32,), generator=gen).cuda()) for _ in range(n)]


def _eager_losses(model, data, loss_fn):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@requires_cuda
@pytest.mark.parametrize("compile", [False, True], ids=["eager-passes", "compiled-passes"])
def test_train_step_captured_with_global_error_mode(compile, layout, monkeypatch, dynamo_reset):
    """TrainStep(cuda_graph=True) captured once with capture_error_mode="global" (stricter
    than its own thread_local); with compile=True the first, eager step warms the compiled
    pass 2 before the capture. The replays train like the hand-written eager loop."""
    from ater_ext import TrainStep, objectives

    original = torch.cuda.graph

    def strict_graph(*args, **kwargs):
        kwargs["capture_error_mode"] = "global"
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "graph", strict_graph)

    def loss_fn(m, x, y):
        return objectives.ater_loss(m, x, y, eps_adv=0.5, eps=0.7, compile=compile)

    data = _batches(4)
    ref = _bn_mlp()
    model = copy.deepcopy(ref)
    want = _eager_losses(ref, data, loss_fn)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), loss_fn, cuda_graph=True)
    got = torch.stack([step(x, y) for x, y in data])
    assert step.captured
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


@requires_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_passes_warmed_then_equal_eager(mode, layout, dynamo_reset):
    """compile= modes (pass 2 through torch.compile; "reduce-overhead" records CUDA graphs of
    it after its warm-up calls): after warming, the losses and gradients equal compile=False's."""
    from ater_ext import objectives

    data = _batches(4)
    ref, model = _bn_mlp(), _bn_mlp()
    for i, (x, y) in enumerate(data):
        lr, _ = objectives.ater_loss(ref, x, y, eps_adv=0.5, eps=0.7)
        lc, _ = objectives.ater_loss(model, x, y, eps_adv=0.5, eps=0.7, compile=mode)
        gr = torch.autograd.grad(lr, list(ref.parameters()))
        gc = torch.autograd.grad(lc, list(model.parameters()))
        torch.testing.assert_close(lc, lr, rtol=1e-7, atol=1e-9, msg=lambda m: f"step {i}: {m}")
        for a, b in zip(gc, gr):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
