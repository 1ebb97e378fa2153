"""Values of the fused ops against the oracle (ater_ext.reference), on every
device and dtype: ordinary data, random variety, zero / tiny / huge rows,
non-contiguous and empty inputs, and the algebraic identities the ops owe us
(dual == two singles, xi cancels in fd_direction, scale invariance)."""
from __future__ import annotations

import pytest
import torch

from _ops_common import (
    DEVICES,
    DTYPES,
    SCALES,
    STEP_OPS,
    output_scales,
    assert_close,
    assert_norm_close,
    assert_norm_matches_truth,
    assert_step_close,
    assert_within_ulps,
    call,
    exact_row_norm,
    make,
    magnitude,
    sample,
    step_inputs,
)
from ater_ext import ops, reference

SHAPES = [
    (1, 1),
    (7, 13),
    (4, 3, 5, 5),  # conv-like
    (64, 784),
    (3, 4099),  # odd, longer than any vector width
    (256, 3072),
    (2049, 5),  # many short rows
    (2, 70001),  # long rows (several blocks per row on a GPU)
]


def check_outputs(name, x, gs, scales, outs, refs):
    for k, (out, ref, s) in enumerate(zip(outs, refs, scales)):
        what = f"{name} output {k}"
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device, what
        assert out.is_contiguous(), f"{what} is not contiguous"
        assert torch.isfinite(out).all(), f"{what} has NaN/Inf"
        assert_step_close(out, ref, x, s, what=what)


# --------------------------------------------------------------- the matrix
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", STEP_OPS)
def test_step_matches_reference(name, shape, dtype, device):
    x, gs = step_inputs(name, shape, dtype, device)
    before = [t.clone() for t in (x, *gs)]
    outs = call(ops, name, x, gs, SCALES[name])
    refs = call(reference, name, x, gs, SCALES[name])
    assert len(outs) == len(output_scales(name))
    check_outputs(name, x, gs, output_scales(name), outs, refs)
    for t, b in zip((x, *gs), before):
        assert torch.equal(t, b), f"{name} modified an input"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_row_norm_matches_reference(shape, dtype, device):
    g = make(shape, dtype, device)
    before = g.clone()
    n = ops.row_norm(g)
    assert n.shape == (shape[0],) and n.dtype == dtype and n.device == g.device
    assert_norm_close(n, reference.row_norm(g), what="row_norm vs reference")
    assert_norm_matches_truth(n, g)  # and the float64 truth of the same values
    assert torch.equal(g, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 33, 4099], ids=lambda d: f"D={d}")
def test_row_norm_of_infinite_and_nan_rows_as_torch(d, dtype, device):
    """Rows holding +inf, -inf (in the vector body or the scalar tail), inf with NaN, NaN:
    the norm torch.linalg.vector_norm gives (inf, inf, NaN, NaN); other rows unaffected."""
    g = make((8, d), dtype, device)
    inf = float("inf")
    g[0, 0] = inf
    g[1, d - 1] = -inf
    g[2, d // 2] = inf
    g[2, 0] = -inf  # two infinities, one sign each
    g[3, 0], g[3, d - 1] = inf, float("nan")
    g[4, d - 1] = float("nan")
    g[5] = inf
    g[6, d // 2] = inf
    g[6, d - 1] = inf * 0 if d > 1 else inf  # NaN beside the inf (D > 1)
    got = ops.row_norm(g)
    want = torch.linalg.vector_norm(g.double(), dim=1).to(dtype)
    torch.testing.assert_close(got[:7], want[:7], equal_nan=True, rtol=0, atol=0)
    assert got[[0, 1, 2, 5]].isposinf().all() and got[[3, 4]].isnan().all()
    assert_norm_close(got[7:], reference.row_norm(g[7:]), what="finite row beside them")


@pytest.mark.parametrize("device", DEVICES)
def test_row_norm_gradient_of_infinite_row_as_torch(device):
    """d||g||/dg at a row holding inf: g / inf, i.e. 0 at finite entries and NaN at the inf, as
    torch.linalg.vector_norm's backward."""
    g = make((3, 9), torch.float64, device)
    g[0, 4] = float("inf")
    g[1, 2] = -float("inf")
    ours = g.clone().requires_grad_()
    theirs = g.clone().requires_grad_()
    w = make((3,), torch.float64, device)
    (ops.row_norm(ours) * w).sum().backward()
    (torch.linalg.vector_norm(theirs, dim=1) * w).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name,scales",
    [
        ("normalized_step", (1e-3,)),
        ("normalized_step", (0.3,)),
        ("normalized_step", (8.0,)),
        ("normalized_step", (1e3,)),
        ("dual_normalized_step", (2.0, 1e-3)),
        ("dual_normalized_step", (1e-6, 1e3)),
        ("dual_normalized_step", (1.0, 1.0)),
        ("fd_direction", (1e-3,)),
        ("fd_direction", (8.0,)),
        ("fd_direction", (1e3,)),
    ],
)
def test_step_scales(name, scales, dtype, device):
    x, gs = step_inputs(name, (5, 37), dtype, device)
    outs = call(ops, name, x, gs, scales)
    refs = call(reference, name, x, gs, scales)
    check_outputs(name, x, gs, scales, outs, refs)


# ----------------------------------------------------- property-like variety
KINDS = ["randn", "uniform", "heavy", "sparse", "rowscale", "constant", "dyadic"]


def random_shape(gen: torch.Generator):
    b = int(torch.randint(1, 10, (1,), generator=gen))
    ndim = int(torch.randint(0, 4, (1,), generator=gen))
    return (b,) + tuple(int(d) for d in torch.randint(1, 41, (ndim,), generator=gen))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", KINDS)
def test_random_variety(kind, seed, dtype, device):
    gen = torch.Generator().manual_seed(1000 * seed + KINDS.index(kind))
    shape = random_shape(gen)
    scale_a = float(10 ** (4 * torch.rand(1, generator=gen, dtype=torch.float64) - 2))
    scale_b = float(10 ** (4 * torch.rand(1, generator=gen, dtype=torch.float64) - 2))
    x = make(shape, dtype, device, gen=gen)
    g = make(shape, dtype, device, kind, gen=gen)
    # fd_direction as ATER uses it: g1 close to g0 (a small finite difference)
    g1 = (g.double() + 1e-2 * sample(shape, kind, gen=gen).to(device)).to(dtype)
    cases = [
        ("normalized_step", (g,), (scale_a,)),
        ("dual_normalized_step", (g,), (scale_a, scale_b)),
        ("fd_direction", (g, g1), (scale_b,)),
    ]
    for name, gs, scales in cases:
        check_outputs(name, x, gs, scales, call(ops, name, x, gs, scales), call(reference, name, x, gs, scales))
    assert_norm_close(ops.row_norm(g), reference.row_norm(g), what="row_norm")


# ------------------------------------------------------------- identities
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (4, 3, 5, 5), (64, 784), (3, 4099)], ids=str)
def test_dual_equals_two_single_steps(shape, dtype, device):
    x = make(shape, dtype, device)
    g = make(shape, dtype, device)
    g[0] = 0  # a zero row too
    a, b = ops.dual_normalized_step(x, g, 0.75, 3.0)
    assert_within_ulps(a, ops.normalized_step(x, g, 0.75), 1, "dual output a")
    assert_within_ulps(b, ops.normalized_step(x, g, 3.0), 1, "dual output b")
    assert torch.equal(a[0], x[0]) and torch.equal(b[0], x[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("xi", [1e-6, 1e-3, 1.0, 1e3])
def test_fd_direction_xi_cancels_fp64(xi, device):
    shape, eps = (6, 5, 10), 2.0
    x = make(shape, torch.float64, device)
    g0 = make(shape, torch.float64, device)
    d = make(shape, torch.float64, device)
    out = ops.fd_direction(x, g0, g0 + xi * d, eps)
    expected = reference.normalized_step(x, d, eps)  # x + eps * normalize(d)
    # g0 + xi*d rounds with error ~1e-16 * (|g0| + xi|d|): relative to the difference xi*d that is
    # ~1e-16 / xi, so at xi = 1e-6 the direction is good to ~1e-10, not to 1e-16.
    assert_close(out, expected, rtol=1e-9, atol=eps * 1e-9 + 1e-12 * magnitude(x, eps), what=f"xi={xi}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,log2_xis",
    [(torch.float64, (-30, -10, 0, 10, 30)), (torch.float32, (-8, 0, 8)), (torch.bfloat16, (0, 1)), (torch.float16, (-4, 0, 4))],
    ids=["fp64", "fp32", "bf16", "fp16"],
)
def test_fd_direction_is_independent_of_xi_exact_data(dtype, log2_xis, device):
    """Dyadic data and xi = 2^k: g0 + xi*d and the difference are exact, so the
    result must not depend on xi beyond rounding of the normalisation itself."""
    shape, eps = (5, 3, 7), 2.0
    x = make(shape, dtype, device)
    g0 = make(shape, torch.float64, "cpu", "dyadic")
    d = make(shape, torch.float64, "cpu", "dyadic")
    d[d == 0] = 0.5  # no zero rows
    expected = reference.normalized_step(x, d.to(dtype).to(device), eps)
    first = None
    for k in log2_xis:
        g1 = g0 + 2.0**k * d
        assert torch.equal(g1.to(dtype).double() - g0.to(dtype).double(), 2.0**k * d), "test data not exact"
        out = ops.fd_direction(x, g0.to(dtype).to(device), g1.to(dtype).to(device), eps)
        assert_step_close(out, expected, x, eps, what=f"xi=2^{k}")
        if first is None:
            first = out
        else:
            assert_within_ulps(out, first, 1, f"xi=2^{k} against xi=2^{log2_xis[0]}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,log2_scales",
    [
        (torch.float32, (-110, -100, -60, -30, 0, 30, 60, 100, 110)),
        (torch.float64, (-990, -900, -500, -250, 0, 250, 500, 900, 990)),
        (torch.bfloat16, (-110, -60, 0, 60, 110)),
        (torch.float16, (-10, 0, 10)),
    ],
    ids=["fp32", "fp64", "bf16", "fp16"],
)
def test_scale_invariance(dtype, log2_scales, device):
    """normalize(2^k g) == normalize(g) and ||2^k g|| == 2^k ||g||, across the
    fast (plain sum of squares) and the slow (max-abs rescaled) paths."""
    shape = (6, 3, 41)
    x = make(shape, dtype, device)
    g = make(shape, torch.float64, "cpu", "dyadic")
    g[g.reshape(6, -1).abs().sum(1) == 0] = 1.0
    base_step = ops.normalized_step(x, g.to(dtype).to(device), 1.5)
    base_norm = ops.row_norm(g.to(dtype).to(device))
    for k in log2_scales:
        gk = (g * 2.0**k).to(dtype).to(device)
        assert torch.equal(gk.double().cpu(), g * 2.0**k), "test data not exact"
        out = ops.normalized_step(x, gk, 1.5)
        assert torch.isfinite(out).all(), f"2^{k}: NaN/Inf"
        assert_step_close(out, base_step, x, 1.5, what=f"normalized_step(x, 2^{k} g)")
        assert_step_close(out, reference.normalized_step(x, gk, 1.5), x, 1.5, what=f"2^{k} vs reference")
        n = ops.row_norm(gk)
        assert_norm_close(n, (base_norm.double() * 2.0**k).to(dtype), what=f"row_norm(2^{k} g)")


# ----------------------------------------------------- zero, tiny, huge rows
EXTREME = {  # entries of a row are ~ this size
    torch.float32: {"tiny": 1e-30, "huge": 1e30, "subnormal": 1e-40},
    torch.float64: {"tiny": 1e-200, "huge": 1e200, "subnormal": 1e-310},
    torch.bfloat16: {"tiny": 1e-30, "huge": 1e30, "subnormal": 1e-39},
    torch.float16: {"tiny": 1e-4, "huge": 300.0, "subnormal": 1e-6},  # norms must fit fp16
}


def extreme_rows(dtype, device, d_shape=(3, 7, 11)):
    """Rows: normal, tiny, huge, zero, subnormal, tiny+zeros, huge+zeros, normal."""
    s = EXTREME[dtype]
    scales = [1.0, s["tiny"], s["huge"], 0.0, s["subnormal"], s["tiny"], s["huge"], 1.0]
    g = sample((len(scales),) + d_shape)
    g = g * torch.tensor(scales, dtype=torch.float64).reshape(-1, *([1] * len(d_shape)))
    g[5, 0] = 0
    g[6, 1:] = 0  # a single non-zero entry
    g = g.to(dtype).to(device)
    nonzero = g.reshape(len(scales), -1).ne(0).any(dim=1)
    assert nonzero.sum() == len(scales) - 1, "test data: only row 3 may be zero"
    return g


def unit_norm_tol(dtype):
    # fp16/bf16: each entry of u rounded once to the dtype, <= eps/2 relative.
    return {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps / 2 + 1e-5)


def assert_unit_rows(u: torch.Tensor, zero_rows, what):
    n = exact_row_norm(u)
    for b in range(u.shape[0]):
        if b in zero_rows:
            assert n[b].item() == 0.0, f"{what}: zero row {b} moved"
        else:
            assert abs(n[b].item() - 1.0) <= unit_norm_tol(u.dtype), f"{what}: row {b} has norm {n[b].item()!r}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_shape", [(3, 7, 11), (1031,)], ids=str)
def test_zero_tiny_huge_rows(d_shape, dtype, device):
    g = extreme_rows(dtype, device, d_shape)
    zero = torch.zeros_like(g)
    x = make(g.shape, dtype, device)

    # row_norm: matches the oracle and the float64 truth; zero row exactly 0
    n = ops.row_norm(g)
    assert torch.isfinite(n).all()
    assert_norm_close(n, reference.row_norm(g), what="row_norm vs reference")
    assert_norm_matches_truth(n, g)
    assert n[3].item() == 0.0

    # (out - x) / scale is a unit vector; with x = 0 and scale = 1, out is u itself
    u = ops.normalized_step(zero, g, 1.0)
    assert torch.isfinite(u).all()
    assert_unit_rows(u, {3}, "normalized_step(0, g, 1)")
    assert_step_close(u, reference.normalized_step(zero, g, 1.0), zero, 1.0, what="normalized_step(0, g, 1)")
    ua, ub = ops.dual_normalized_step(zero, g, 1.0, 0.5)
    assert_unit_rows(ua, {3}, "dual a")
    assert_unit_rows(ub * 2, {3}, "dual b")
    # fd_direction: g1 - g0 = 2g exactly (g0 = -g, g1 = g)
    fd = ops.fd_direction(zero, -g, g, 1.0)
    assert_unit_rows(fd, {3}, "fd_direction(0, -g, g, 1)")
    assert_step_close(fd, reference.fd_direction(zero, -g, g, 1.0), zero, 1.0, what="fd_direction(0, -g, g, 1)")

    # with an ordinary x: matches the oracle, finite, zero row moves nothing (exactly)
    for name, gs, scales, all_zero in [
        ("normalized_step", (g,), (0.75,), False),
        ("dual_normalized_step", (g,), (0.75, 3.0), False),
        ("fd_direction", (zero, g), (2.0,), False),
        ("fd_direction", (g, g.clone()), (2.0,), True),  # every difference row zero
    ]:
        outs = call(ops, name, x, gs, scales)
        check_outputs(name, x, gs, scales, outs, call(reference, name, x, gs, scales))
        for out in outs:
            assert torch.equal(out[3], x[3]), f"{name}: the zero row moved"
            if all_zero:
                assert torch.equal(out, x), "fd_direction with g1 == g0 moved x"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,exponents",
    [
        (torch.float32, range(-44, 38, 2)),
        (torch.float64, range(-320, 306, 15)),
        (torch.bfloat16, range(-40, 38, 3)),
        (torch.float16, range(-7, 5)),
    ],
    ids=["fp32", "fp64", "bf16", "fp16"],
)
def test_row_scale_sweep(dtype, exponents, device):
    """One row per power of ten across the dtype's range: every row, whichever
    path its sum of squares takes, normalises to a unit vector."""
    exps = list(exponents)
    d = 257
    g = sample((len(exps), d)) * torch.tensor([10.0**e for e in exps], dtype=torch.float64)[:, None]
    g = g.to(dtype).to(device)
    assert g.ne(0).any(dim=1).all()
    zero = torch.zeros_like(g)
    u = ops.normalized_step(zero, g, 1.0)
    assert torch.isfinite(u).all()
    assert_unit_rows(u, set(), "normalized_step(0, g, 1)")
    assert_step_close(u, reference.normalized_step(zero, g, 1.0), zero, 1.0, what="vs reference")
    n = ops.row_norm(g)
    assert_norm_matches_truth(n, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_row_does_not_leak_into_others(dtype, device):
    """A row holding inf/NaN changes only its own output row."""
    x = make((4, 33), dtype, device)
    g = make((4, 33), dtype, device)
    g[1, 5] = float("inf")
    g[2, 7] = float("nan")
    good = [0, 3]
    for name, gs, scales in [
        ("normalized_step", (g,), (0.75,)),
        ("dual_normalized_step", (g,), (0.75, 3.0)),
        ("fd_direction", (torch.zeros_like(g), g), (2.0,)),
    ]:
        outs = call(ops, name, x, gs, scales)
        refs = call(reference, name, x[good], tuple(t[good] for t in gs), scales)
        for out, ref, s in zip(outs, refs, scales):
            assert_step_close(out[good], ref, x[good], s, what=name)
    assert_norm_close(ops.row_norm(g)[good], reference.row_norm(g[good]), what="row_norm")


# -------------------------------------------------------------- 1-D, D = 1
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_dimensional_rows(dtype, device):
    """A [B] tensor has D = 1: normalize(v) = sign(v), ||v|| = |v|."""
    x = make((6,), dtype, device)
    g = torch.tensor([2.0, -3.0, 0.0, 1e-3, -7e3, 0.5], dtype=dtype, device=device)
    expected = (x.double() + 0.75 * torch.sign(g.double())).to(dtype)
    out = ops.normalized_step(x, g, 0.75)
    assert out.shape == (6,)
    assert_step_close(out, expected, x, 0.75, what="normalized_step")
    assert_step_close(out, reference.normalized_step(x, g, 0.75), x, 0.75, what="vs reference")
    a, b = ops.dual_normalized_step(x, g, 0.75, 2.0)
    assert_step_close(a, expected, x, 0.75, what="dual a")
    assert_step_close(b, (x.double() + 2.0 * torch.sign(g.double())).to(dtype), x, 2.0, what="dual b")
    fd = ops.fd_direction(x, torch.zeros_like(g), g, 0.75)
    assert_step_close(fd, expected, x, 0.75, what="fd_direction")
    assert torch.equal(ops.row_norm(g), g.abs())


# ------------------------------------------------------------ empty inputs
EMPTY_SHAPES = [(0,), (0, 5), (0, 3, 4), (3, 0), (2, 0, 4), (0, 0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty(shape, dtype, device):
    x = torch.empty(shape, dtype=dtype, device=device)
    g = torch.empty(shape, dtype=dtype, device=device)
    for out in (
        ops.normalized_step(x, g, 0.5),
        *ops.dual_normalized_step(x, g, 0.5, 2.0),
        ops.fd_direction(x, g, g.clone(), 0.5),
    ):
        assert out.shape == shape and out.dtype == dtype and out.device == x.device and out.numel() == 0
    n = ops.row_norm(g)
    assert n.shape == (shape[0],) and n.dtype == dtype and n.device == g.device
    assert torch.equal(n, torch.zeros(shape[0], dtype=dtype, device=device))  # D = 0: zero norms


# ----------------------------------------------------- non-contiguous inputs
def views(shape, dtype, device):
    """Non-contiguous tensors of a given 2-D shape [B, D], by several routes."""
    b, d = shape
    return {
        "transposed": make((d, b), dtype, device).t(),
        "column_slice": make((b, 2 * d), dtype, device)[:, ::2],
        "row_slice": make((2 * b, d), dtype, device)[::2],
        "offset": make((b + 1, d + 3), dtype, device)[1:, 3:],
        "batch_expanded": make((1, d), dtype, device).expand(b, d),
        "inner_expanded": make((b, 1), dtype, device).expand(b, d),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "view", ["transposed", "column_slice", "row_slice", "offset", "batch_expanded", "inner_expanded"]
)
@pytest.mark.parametrize("which", ["x", "g", "all"])
def test_non_contiguous(which, view, dtype, device):
    shape = (9, 37)
    nc = views(shape, dtype, device)[view]
    assert not nc.is_contiguous() or view == "offset"

    def pick(arg):
        return views(shape, dtype, device)[view] if which in (arg, "all") else make(shape, dtype, device)

    x, g, g0 = pick("x"), pick("g"), pick("g")
    for name, gs, scales in [
        ("normalized_step", (g,), (0.75,)),
        ("dual_normalized_step", (g,), (0.75, 3.0)),
        ("fd_direction", (g0, g), (2.0,)),
    ]:
        outs = call(ops, name, x, gs, scales)
        contig = call(ops, name, x.contiguous(), tuple(t.contiguous() for t in gs), scales)
        refs = call(reference, name, x, gs, scales)
        for out, c, ref, s in zip(outs, contig, refs, scales):
            assert out.is_contiguous() and out.shape == x.shape
            assert_step_close(out, c, x, s, what=f"{name} {view} vs contiguous")
            assert_step_close(out, ref, x, s, what=f"{name} {view} vs reference")
    assert_norm_close(ops.row_norm(g), ops.row_norm(g.contiguous()), what="row_norm vs contiguous")
    assert_norm_close(ops.row_norm(g), reference.row_norm(g), what="row_norm vs reference")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_and_permuted(dtype, device):
    x = make((4, 3, 5, 6), dtype, device).contiguous(memory_format=torch.channels_last)
    g = make((4, 3, 5, 6), dtype, device).contiguous(memory_format=torch.channels_last)
    g0 = make((4, 5, 6, 3), dtype, device).permute(0, 3, 1, 2)  # a permuted view, same logical shape
    out = ops.normalized_step(x, g, 0.75)
    assert out.shape == x.shape and out.is_contiguous()  # output in the default layout
    assert_step_close(out, ops.normalized_step(x.contiguous(), g.contiguous(), 0.75), x, 0.75, what="channels_last")
    assert_step_close(out, reference.normalized_step(x, g, 0.75), x, 0.75, what="vs reference")
    fd = ops.fd_direction(x, g0, g, 2.0)
    assert fd.is_contiguous()
    assert_step_close(fd, reference.fd_direction(x, g0, g, 2.0), x, 2.0, what="fd permuted")
    assert_norm_close(ops.row_norm(g0), reference.row_norm(g0.contiguous()), what="row_norm permuted")


# ------------------------------------------------------------- CPU vs CUDA
@pytest.mark.parametrize("device", [p for p in DEVICES if p.id == "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (64, 784), (3, 4099), (2, 70001)], ids=str)
def test_cuda_matches_cpu(shape, dtype, device):
    x = make(shape, dtype, "cpu")
    g = make(shape, dtype, "cpu")
    g[0] = 0
    for name, gs, scales in [
        ("normalized_step", (g,), (0.75,)),
        ("dual_normalized_step", (g,), (0.75, 3.0)),
        ("fd_direction", (torch.roll(g, 1, 0), g), (2.0,)),
    ]:
        cpu = call(ops, name, x, gs, scales)
        cuda = call(ops, name, x.to(device), tuple(t.to(device) for t in gs), scales)
        for a, b, s in zip(cuda, cpu, scales):
            assert a.device.type == "cuda"
            assert_step_close(a.cpu(), b, x, s, what=f"{name} cuda vs cpu")
    assert_norm_close(ops.row_norm(g.to(device)).cpu(), ops.row_norm(g), what="row_norm cuda vs cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_outputs_round_to_nearest_even_and_keep_denormals(dtype, device):
    """With one-hot rows (norm 1, so u = g exactly) the step is out = round(x + scale * g):
    one fp32 add, then one rounding to the output dtype, which must be torch's
    (round half to even, denormals kept, not flushed: the CPU's native bf16
    conversion flushes them and must not be used for such chunks)."""
    info = torch.finfo(dtype)
    ulp1 = info.eps  # spacing just above 1.0
    rows = 96  # several SIMD chunks per row, some rows normal, some denormal
    x = torch.ones(rows, 64, dtype=torch.float32)
    x[1::2] += ulp1  # odd last mantissa bit: a tie rounds up there, down on even rows
    tiny = info.smallest_normal
    x[rows // 2:] = torch.linspace(-4 * tiny, 4 * tiny, 64)  # denormal-range outputs
    g = torch.zeros_like(x)
    g[:, 5] = 1.0
    scale = ulp1 / 2  # exactly half an ulp at 1.0: a tie
    x_r = x.to(dtype)
    cases = {"tie": scale, "denormal": tiny / 8}
    for what, s in cases.items():
        want = (x_r.float() + s * g).to(dtype)
        got = ops.normalized_step(x_r.to(device), g.to(dtype).to(device), s).cpu()
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), what
    # the tie case really contains both roundings, and the denormal case nonzero denormals
    tied = ops.normalized_step(x_r, g.to(dtype), cases["tie"])[: rows // 2, 5].float()
    assert set(tied.tolist()) == {1.0, 1.0 + 2 * ulp1}
    assert ((x_r[rows // 2:].float().abs() < tiny) & (x_r[rows // 2:] != 0)).any()
