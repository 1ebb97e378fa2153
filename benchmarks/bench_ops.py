#!/usr/bin/env python
"""Kernel benchmark: ater_ext's fused ops against the PyTorch a user would write.

For every op, shape and dtype one run times these variants side by side:

    fused             the ater_ext op, allocating its output
    fused_out         the ater_ext op writing into a preallocated ``out=`` buffer
    two_calls         (dual_normalized_step only) two ``normalized_step`` calls
    unfused_ops       (fd_sphere_step only) the three ater_ext launches it fuses:
                      ``normalized_step(x, fd_direction(z, g0, g1, step) - x, eps)``
    eager             the plain PyTorch composition (``eager_*`` below)
    compiled          ``torch.compile(eager, dynamic=False)``, warmed up
    copy_same_bytes   ``dst.copy_(src)`` moving as many bytes as the op (pair of fused_out)
    clone_same_bytes  ``src.clone()`` moving as many bytes as the op (pair of fused)

Every variant is checked against ``ater_ext.reference`` before anything is
timed, and a mismatch aborts the run. Times are medians of
``torch.utils.benchmark.Timer.blocked_autorange`` (which synchronises CUDA).
The figures go to ``<out>/<machine>.json`` and ``<out>/<machine>.md``
(``<machine>-quick.*`` with ``--quick``, a smoke test), written atomically.

On CUDA a second table times the shapes the default "rows" kernel layout
serves badly (few long rows, tiny rows, D not a multiple of the vector width,
views that start off a 16-byte boundary) in both kernel layouts
(``ater_ext.ops.set_cuda_layout``), each as ``fused_out`` against a copy of the
same bytes, after checking both layouts against the oracle (``--no-layouts``
skips it).

    python benchmarks/bench_ops.py [--device cpu|cuda] [--quick] [--no-layouts] [--ops fd_sphere_step ...]
                                   [--out benchmarks/results]

``--ops`` times only the ops named (then the files are ``<machine>-<ops>.*``).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import logging
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.benchmark as tbench
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ater_ext import ops, reference
from ater_ext.atomic_io import write_json, write_text

log = logging.getLogger("bench_ops")

SHAPES = ((128, 784), (256, 3072), (1024, 3072), (4096, 3072))
CUDA_ONLY_SHAPES = ((8192, 3072),)
QUICK_SHAPES = SHAPES[:2]
DTYPES = (torch.float32, torch.bfloat16)
MIN_RUN_TIME_S = {"full": 0.5, "quick": 0.02}  # full: ~3 min on 2 CPU cores

# Tolerances against the oracle. fp32: a few ulps of results of order 1.
# bf16, relative to the magnitudes |x| + |out| of the sum: the fused op and the
# compiled graph compute in fp32 and round once, as the oracle does, so they sit
# within one bf16 ulp (2**-7 relative) of it. The eager composition also rounds
# d, ||d||, eps * d and the quotient to bf16 (unit roundoff u = 2**-8 each):
# 4u of the step plus u of the sum plus the oracle's own u, 6u at most.
FP32_TOL = 1e-5
BF16_REL_TOL = 1e-2
BF16_EAGER_REL_TOL = 6 * 2.0**-8
# The variants whose intermediates are rounded to bf16 (eager; unfused_ops' fd_direction output and difference).
ROUNDS_INTERMEDIATES = ("eager", "unfused_ops")

COMPARED = ("eager", "compiled", "two_calls", "unfused_ops")  # speedup of fused over each of these
BANDWIDTH_VARIANTS = ("fused", "fused_out", "copy_same_bytes", "clone_same_bytes")
BUSY_CPUS = 0.2  # warn when other processes used more CPUs than this while a case was timed


# ------------------------------------------------------ what a user would write
def _per_row(n: Tensor, like: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ...]``, broadcastable against ``like``."""
    return n.view(-1, *([1] * (like.dim() - 1)))


def eager_fd_direction(x: Tensor, g0: Tensor, g1: Tensor, eps: float) -> Tensor:
    """``x + eps * (g1 - g0) / ||g1 - g0||`` per row, in plain PyTorch."""
    d = g1 - g0
    n = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    return x + eps * d / _per_row(n, d)


def eager_normalized_step(x: Tensor, g: Tensor, scale: float) -> Tensor:
    """``x + scale * g / ||g||`` per row, in plain PyTorch."""
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return x + scale * g / _per_row(n, g)


def eager_dual_normalized_step(x: Tensor, g: Tensor, a: float, b: float) -> Tuple[Tensor, Tensor]:
    """``(x + a * u, x + b * u)`` with ``u = g / ||g||`` per row, in plain PyTorch."""
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    u = g / _per_row(n, g)
    return x + a * u, x + b * u


def two_normalized_steps(x: Tensor, g: Tensor, a: float, b: float) -> Tuple[Tensor, Tensor]:
    """``dual_normalized_step`` without the fusion: two launches, ``g`` read twice."""
    return ops.normalized_step(x, g, a), ops.normalized_step(x, g, b)


def eager_fd_sphere_step(x: Tensor, z: Tensor, g0: Tensor, g1: Tensor, step: float, eps: float) -> Tensor:
    """``x + eps * normalize(z + step * normalize(g1 - g0) - x)`` per row, in plain PyTorch."""
    moved = eager_fd_direction(z, g0, g1, step) - x
    return eager_normalized_step(x, moved, eps)


def unfused_sphere_step(x: Tensor, z: Tensor, g0: Tensor, g1: Tensor, step: float, eps: float) -> Tensor:
    """``fd_sphere_step`` as three ater_ext launches (what ``x_max(steps=k)`` ran before the fusion)."""
    return ops.normalized_step(x, ops.fd_direction(z, g0, g1, step) - x, eps)


# ------------------------------------------------------------------ the ops
@dataclass(frozen=True)
class OpSpec:
    """One op under test: its variants and the tensor-sizes it reads and writes."""

    name: str
    n_inputs: int  # [B, D] tensors read; x is the first
    n_outputs: int  # [B, D] tensors written
    scales: Tuple[float, ...]  # step lengths, in units of sqrt(D)
    fused: Callable[..., Any]
    eager: Callable[..., Any]
    reference: Callable[..., Any]
    has_out: bool = True
    extra: Tuple[Tuple[str, Callable[..., Any]], ...] = ()
    # the magnitudes the results' bf16 rounding scales with, from the input tensors
    magnitude: Callable[[tuple], Tensor] = lambda tensors: tensors[0].abs()

    @property
    def traffic(self) -> int:
        """Tensor-sizes moved by one call: every input read once, every output written once."""
        return self.n_inputs + self.n_outputs


# Step lengths of ~sqrt(D) make the step as large as x itself (u has entries of
# ~1/sqrt(D)), so the correctness check sees the direction: a paper-sized step
# would vanish in bf16 rounding. The value does not change the timings.
OPS = (
    OpSpec("fd_direction", 3, 1, (0.5,), ops.fd_direction, eager_fd_direction, reference.fd_direction),
    OpSpec("normalized_step", 2, 1, (0.5,), ops.normalized_step, eager_normalized_step, reference.normalized_step),
    OpSpec(
        "dual_normalized_step", 2, 2, (0.5, 0.25), ops.dual_normalized_step, eager_dual_normalized_step,
        reference.dual_normalized_step, has_out=False, extra=(("two_calls", two_normalized_steps),),
    ),
    OpSpec(
        "fd_sphere_step", 4, 1, (0.5, 0.5), ops.fd_sphere_step, eager_fd_sphere_step, reference.fd_sphere_step,
        has_out=False, extra=(("unfused_ops", unfused_sphere_step),),
        magnitude=lambda t: t[0].abs() + t[1].abs(),  # the moved point z + step * u is rounded at |z|'s scale
    ),
)


# ----------------------------------------------------------------- one case
def make_inputs(spec: OpSpec, shape: Sequence[int], dtype: torch.dtype, device: str) -> Tuple[tuple, tuple]:
    """Random ``[B, D]`` inputs (x first) and the op's scalar arguments."""
    tensors = tuple(torch.randn(*shape, dtype=dtype, device=device) for _ in range(spec.n_inputs))
    root_d = float(torch.Size(shape[1:]).numel()) ** 0.5
    return tensors, tuple(s * root_d for s in spec.scales)


def make_variants(spec: OpSpec, tensors: tuple, scalars: tuple, compiled: bool = True) -> Dict[str, Callable[[], Any]]:
    """Zero-argument callables of every computing variant (copies excluded)."""
    args = (*tensors, *scalars)
    variants: Dict[str, Callable[[], Any]] = {"fused": functools.partial(spec.fused, *args)}
    if spec.has_out:
        buf = torch.empty_like(tensors[0])
        variants["fused_out"] = functools.partial(spec.fused, *args, out=buf)
    for name, fn in spec.extra:
        variants[name] = functools.partial(fn, *args)
    variants["eager"] = functools.partial(spec.eager, *args)
    if compiled:
        variants["compiled"] = functools.partial(torch.compile(spec.eager, dynamic=False), *args)
    return variants


def same_bytes_baselines(like: Tensor, traffic: int) -> Dict[str, Callable[[], Any]]:
    """``copy_`` and ``clone`` of a flat tensor of ``traffic / 2`` tensor-sizes: one read
    plus one write of it moves exactly the op's bytes."""
    src = torch.randn(like.numel() * traffic // 2, dtype=like.dtype, device=like.device)
    dst = torch.empty_like(src)
    return {"copy_same_bytes": lambda: dst.copy_(src), "clone_same_bytes": src.clone}


def assert_matches_reference(label: str, got: Any, want: Any, x: Tensor, bf16_rel_tol: float = BF16_REL_TOL) -> None:
    """Raise AssertionError unless every output of ``got`` equals the oracle's within tolerance
    (bf16: relative to ``|x| + |out|``; ``x`` may be any tensor of the magnitudes, ``OpSpec.magnitude``)."""
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    assert len(got) == len(want), f"{label}: {len(got)} outputs, the reference has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        what = f"{label} (output {i})"
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}: {g.shape} {g.dtype} != {w.shape} {w.dtype}"
        if g.dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=FP32_TOL, atol=FP32_TOL, msg=lambda m: f"{what}: {m}")
            continue
        g32, w32 = g.float(), w.float()
        err = (g32 - w32).abs()
        bound = bf16_rel_tol * (x.float().abs() + w32.abs())
        bad = ~(err <= bound)  # NaN fails too
        assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off by more than"
                                     f" {bf16_rel_tol:.3g} x (|x| + |out|); worst |err| {float(err.max()):.3g}")


def cpu_snapshot() -> Tuple[float, float, float]:
    """(wall seconds, CPU-seconds the whole machine has been busy, CPU-seconds of this process)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait; steal counts as busy
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def others_cpus(start: Tuple[float, float, float]) -> float:
    """Mean number of CPUs that other processes kept busy since ``start = cpu_snapshot()``."""
    wall, busy, own = (b - a for a, b in zip(start, cpu_snapshot()))
    return max(0.0, (busy - own) / wall)


def measure(fn: Callable[[], Any], min_run_time: float) -> tbench.Measurement:
    """``blocked_autorange`` of ``fn`` at the process's thread count (Timer's default is 1 thread)."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time)


def summarise(spec: OpSpec, shape: Sequence[int], dtype: torch.dtype, nbytes: int,
              measurements: Dict[str, tbench.Measurement]) -> dict:
    """One row of the results table: medians (and IQRs), speedups of fused, bandwidths and their ratios."""
    times = {k: m.median for k, m in measurements.items()}
    gbps = {k: nbytes / times[k] / 1e9 for k in BANDWIDTH_VARIANTS if k in times}
    ratio = lambda a, b: gbps[a] / gbps[b] if a in gbps and b in gbps else None  # noqa: E731
    return {
        "op": spec.name,
        "shape": list(shape),
        "dtype": dtype_name(dtype),
        "tensor_sizes_moved": spec.traffic,
        "bytes": nbytes,
        "median_s": times,
        "iqr_s": {k: m.iqr for k, m in measurements.items()},
        "speedup_of_fused": {k: times[k] / times["fused"] for k in COMPARED if k in times},
        "gbps": gbps,
        "fused_out_vs_copy": ratio("fused_out", "copy_same_bytes"),
        "fused_vs_clone": ratio("fused", "clone_same_bytes"),
    }


def run_case(spec: OpSpec, shape: Sequence[int], dtype: torch.dtype, device: str, min_run_time: float,
             compiled: bool = True) -> dict:
    """Check every variant against the oracle, then time them all; one results row."""
    torch.compiler.reset()  # one static graph per case; never hit dynamo's recompile limit
    tensors, scalars = make_inputs(spec, shape, dtype, device)
    want = spec.reference(*tensors, *scalars)
    variants = make_variants(spec, tensors, scalars, compiled)
    label = f"{spec.name} {list(shape)} {dtype_name(dtype)}"
    for name, fn in variants.items():  # the first call also compiles / warms up
        tol = BF16_EAGER_REL_TOL if name in ROUNDS_INTERMEDIATES else BF16_REL_TOL
        assert_matches_reference(f"{label} {name}", fn(), want, spec.magnitude(tensors), tol)
    variants.update(same_bytes_baselines(tensors[0], spec.traffic))
    start = cpu_snapshot()
    measurements = {name: measure(fn, min_run_time) for name, fn in variants.items()}
    nbytes = spec.traffic * tensors[0].numel() * tensors[0].element_size()
    return {**summarise(spec, shape, dtype, nbytes, measurements), "others_cpus": others_cpus(start)}



# ------------------------------------------------------- CUDA kernel layouts
# The shapes issue 17 found the "rows" layout slow on, plus the target shape:
# (shape, offset in elements of every tensor's start from an aligned allocation).
LAYOUT_SHAPES = (
    ((8192, 3072), 0),
    ((64, 150528), 0),  # few long rows: one block per row leaves most SMs idle
    ((1, 100_000_000), 0),
    ((10_000_000, 4), 0),  # tiny rows: one warp per row, 28 of 32 lanes idle
    ((8192, 4099), 0),  # D not a multiple of the vector width: all scalar
    ((65536, 3, 5, 5), 0),
    ((8192, 3072), 2),  # every tensor 8 bytes (fp32) past a 16-byte boundary: all scalar
)
QUICK_LAYOUT_SHAPES = (((8192, 3072), 0), ((64, 150528), 0), ((8192, 4099), 0), ((8192, 3072), 2))
LAYOUT_OPS = ("fd_direction", "normalized_step")
LAYOUT_TARGET = 0.85  # of a device copy's bandwidth, by the better layout


def offset_copy(t: Tensor, offset: int) -> Tensor:
    """A contiguous copy of ``t`` starting ``offset`` elements into a fresh allocation."""
    if offset == 0:
        return t.clone()
    flat = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = flat[offset:].view(t.shape)
    view.copy_(t)
    return view


def run_layout_case(spec: OpSpec, shape: Sequence[int], dtype: torch.dtype, offset: int, device: str,
                    min_run_time: float) -> dict:
    """``spec``'s ``out=`` variant in every CUDA layout (each checked against the oracle
    first) and a copy of the same bytes; one row of the layout table."""
    tensors, scalars = make_inputs(spec, shape, dtype, device)
    tensors = tuple(offset_copy(t, offset) for t in tensors)
    out = offset_copy(torch.empty_like(tensors[0]), offset)
    want = spec.reference(*tensors, *scalars)
    label = f"{spec.name} {list(shape)} {dtype_name(dtype)} offset {offset}"
    measurements = {}
    for layout in ops.CUDA_LAYOUTS:
        with ops.cuda_layout(layout):
            out.fill_(float("nan"))
            spec.fused(*tensors, *scalars, out=out)
            assert_matches_reference(f"{label} {layout}", out, want, spec.magnitude(tensors))
            measurements[layout] = measure(functools.partial(spec.fused, *tensors, *scalars, out=out), min_run_time)
    del want
    copy = same_bytes_baselines(tensors[0], spec.traffic)["copy_same_bytes"]
    measurements["copy_same_bytes"] = measure(copy, min_run_time)
    nbytes = spec.traffic * tensors[0].numel() * tensors[0].element_size()
    times = {k: m.median for k, m in measurements.items()}
    vs_copy = {k: times["copy_same_bytes"] / times[k] for k in ops.CUDA_LAYOUTS}
    best = max(vs_copy, key=vs_copy.get)
    return {"op": spec.name, "shape": list(shape), "dtype": dtype_name(dtype), "offset_elements": offset,
            "bytes": nbytes, "median_s": times, "iqr_s": {k: m.iqr for k, m in measurements.items()},
            "gbps": {k: nbytes / v / 1e9 for k, v in times.items()}, "vs_copy": vs_copy,
            "adaptive_speedup": times["rows"] / times["adaptive"], "best_layout": best,
            "status": "PASS" if vs_copy[best] >= LAYOUT_TARGET else "FAIL"}


def layout_markdown(rows: List[dict]) -> str:
    """The layout table: µs and share of the copy's bandwidth per layout."""
    lines = [f"Both layouts checked against the oracle first. `vs copy` = copy time / op time at the same bytes"
             f" (target: the better layout >= {LAYOUT_TARGET:.0%}); `offset` = elements every tensor starts past a"
             " 16-byte boundary.", "",
             "| op | shape | dtype | offset | rows µs | adaptive µs | copy µs | rows vs copy | adaptive vs copy |"
             " adaptive speedup | target |", "|" + "---|" * 11]
    for r in rows:
        t, v = r["median_s"], r["vs_copy"]
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['offset_elements']} | {_us(t['rows'])} |"
                     f" {_us(t['adaptive'])} | {_us(t['copy_same_bytes'])} | {v['rows']:.0%} | {v['adaptive']:.0%} |"
                     f" {r['adaptive_speedup']:.2f}x | **{r['status']}** ({r['best_layout']}) |")
    return "\n".join(lines)


# ------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """A goal on one results row: ``metric(row) >= threshold``."""

    device: str
    op: str
    shape: Tuple[int, ...]
    dtype: str
    metric: str  # key of METRICS
    threshold: float


METRICS: Dict[str, Tuple[str, Callable[[dict], Optional[float]]]] = {
    "vs_eager": ("fused speedup over eager", lambda r: r["speedup_of_fused"]["eager"]),
    "vs_compiled": ("fused speedup over compiled", lambda r: r["speedup_of_fused"]["compiled"]),
    "out_vs_copy": ("fused_out bandwidth / copy bandwidth", lambda r: r["fused_out_vs_copy"]),
}

TARGETS = (
    Target("cpu", "fd_direction", (256, 3072), "float32", "vs_eager", 4.0),
    Target("cpu", "fd_direction", (256, 3072), "float32", "vs_compiled", 1.0),
    Target("cpu", "fd_direction", (4096, 3072), "float32", "out_vs_copy", 0.60),
    Target("cuda", "fd_direction", (8192, 3072), "float32", "out_vs_copy", 0.85),
    Target("cuda", "fd_direction", (8192, 3072), "bfloat16", "out_vs_copy", 0.85),
)


def evaluate_targets(rows: List[dict], device: str) -> List[dict]:
    """PASS / FAIL (or NOT MEASURED) of every target of ``device`` whose op was run, from the measured rows."""
    verdicts = []
    ran = {r["op"] for r in rows}
    for t in (t for t in TARGETS if t.device == device and t.op in ran):
        row = next((r for r in rows if (r["op"], tuple(r["shape"]), r["dtype"]) == (t.op, t.shape, t.dtype)), None)
        description, metric = METRICS[t.metric]
        value = metric(row) if row is not None else None
        status = "NOT MEASURED" if value is None else ("PASS" if value >= t.threshold else "FAIL")
        verdicts.append({"op": t.op, "shape": list(t.shape), "dtype": t.dtype, "metric": description,
                         "threshold": t.threshold, "value": value, "status": status,
                         "others_cpus": row["others_cpus"] if row is not None else None})
    return verdicts


# ------------------------------------------------------------------- report
def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def machine_info(device: str) -> Tuple[str, str]:
    """(slug for file names, human-readable name) of the machine that runs ``device``."""
    if device == "cuda":
        name = slug_source = torch.cuda.get_device_name()
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor() or "cpu")
        name, slug_source = f"{model} ({os.cpu_count()} cores)", f"{model}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", slug_source.lower()).strip("-"), name


def _us(seconds: Optional[float]) -> str:
    """Seconds as µs for the table: 3-4 significant digits, "—" if absent."""
    if seconds is None:
        return "—"
    us = seconds * 1e6
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}"


def _num(value: Optional[float], fmt: str) -> str:
    """``format(value, fmt)``, "—" if absent."""
    return "—" if value is None else format(value, fmt)


def markdown_table(rows: List[dict]) -> str:
    """One table of medians, speedups, bandwidths and ratios; columns are the variants present."""
    variants = [v for v in ("fused", "fused_out", "two_calls", "unfused_ops", "eager", "compiled", "copy_same_bytes",
                            "clone_same_bytes") if any(v in r["median_s"] for r in rows)]
    speedups = [k for k in COMPARED if any(k in r["speedup_of_fused"] for r in rows)]
    short = lambda v: v.removesuffix("_same_bytes")  # noqa: E731
    header = (["shape", "dtype"] + [f"{short(v)} µs" for v in variants] + [f"fused ×{k}" for k in speedups]
              + [f"GB/s {short(v)}" for v in BANDWIDTH_VARIANTS] + ["fused_out/copy", "fused/clone", "others"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = ([str(r["shape"]), r["dtype"]] + [_us(r["median_s"].get(v)) for v in variants]
                 + [_num(r["speedup_of_fused"].get(k), ".2f") for k in speedups]
                 + [_num(r["gbps"].get(v), ".1f") for v in BANDWIDTH_VARIANTS]
                 + [_num(r["fused_out_vs_copy"], ".0%"), _num(r["fused_vs_clone"], ".0%"),
                    _num(r["others_cpus"], ".2f")])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """The human-readable report: set-up, one table per op, then the targets."""
    parts = [
        f"# ater_ext kernel benchmark: {report['machine_name']}",
        "",
        f"device `{report['device']}`, torch {report['torch']}, {report['threads']} threads, {report['date']}, "
        f"`blocked_autorange(min_run_time={report['min_run_time_s']})` medians"
        + (" (**--quick smoke run**)" if report["quick"] else "") + ".",
        f"Every variant matched `ater_ext.reference` before timing (fp32 rtol = atol = {FP32_TOL:g};"
        f" bf16 {BF16_REL_TOL:g} of |x| + |out| (fd_sphere_step: |x| + |z| + |out|), {BF16_EAGER_REL_TOL:.3g} for eager"
        " and unfused_ops, which round their intermediates to bf16).",
        "Times in µs. GB/s = bytes read + written by the op (each input read once, each output written once) /"
        " median time. `copy` and `clone` (`copy_same_bytes`, `clone_same_bytes` in the JSON) move the same bytes;"
        " `fused ×k` = time of k / time of fused. `others` = CPUs kept busy by other processes while the case was"
        " timed (from /proc/stat).",
        "",
        "On CPU, glibc serves allocations above its mmap threshold (at most 32 MB) with a fresh mmap that is"
        " page-faulted on first touch and unmapped on free, on every call; at [4096, 3072] fp32 (48 MB a tensor)"
        " that dominates any op that allocates its output. Hence two pairs: the allocating `fused` against"
        " `clone_same_bytes`, and the preallocated `fused_out` against `copy_same_bytes`.",
    ]
    busy = [r for r in report["results"] if r["others_cpus"] > BUSY_CPUS]
    if busy:
        parts += ["", f"**Warning: other processes kept more than {BUSY_CPUS:g} CPU busy while {len(busy)} of the"
                  f" {len(report['results'])} cases were timed (column `others`, up to"
                  f" {max(r['others_cpus'] for r in busy):.2f} CPUs); their times, of multi-threaded ops above all,"
                  " are inflated and not trustworthy. Rerun on a quiet machine.**"]
    for op in dict.fromkeys(r["op"] for r in report["results"]):
        rows = [r for r in report["results"] if r["op"] == op]
        parts += ["", f"## {op} (moves {rows[0]['tensor_sizes_moved']} tensor-sizes)", "", markdown_table(rows)]
    if report.get("layouts"):
        parts += ["", "## CUDA kernel layouts (`fused_out`)", "", layout_markdown(report["layouts"])]
    parts += ["", "## Targets", ""]
    if not report["targets"]:
        parts.append("(none for the ops run)")
    for v in report["targets"]:
        value = "n/a" if v["value"] is None else f"{v['value']:.2f}"
        busy = v["others_cpus"] is not None and v["others_cpus"] > BUSY_CPUS
        parts.append(f"- **{v['status']}** {v['op']} {v['shape']} {v['dtype']}: {v['metric']} = {value}"
                     f" (target >= {v['threshold']:g})"
                     + (f"; *unreliable: other processes kept {v['others_cpus']:.2f} CPUs busy*" if busy else ""))
    return "\n".join(parts) + "\n"


def write_report(report: dict, out_dir: Path) -> Tuple[Path, Path]:
    """``<slug>.json`` (everything) and ``<slug>.md`` (tables and targets) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "-".join([report["machine"], *(report.get("ops") or [])]) + ("-quick" if report["quick"] else "")
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json(str(json_path), report)
    write_text(str(md_path), render_markdown(report))
    return json_path, md_path


# --------------------------------------------------------------------- main
def parse_shapes(text: str) -> Tuple[Tuple[int, ...], ...]:
    """``"256x3072,8192x3072"`` -> ``((256, 3072), (8192, 3072))``."""
    try:
        shapes = tuple(tuple(int(d) for d in part.split("x")) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes must look like 256x3072,8192x3072, got {text!r}") from None
    if any(len(s) < 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"every shape needs B and D >= 1, got {text!r}")
    return shapes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="two shapes and short runs: a smoke test")
    p.add_argument("--no-layouts", action="store_true", help="CUDA: skip the table of both kernel layouts")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma-separated BxD shapes instead of the default list, e.g. 256x3072,8192x3072")
    p.add_argument("--ops", nargs="+", choices=[spec.name for spec in OPS], default=None,
                   help="time only these ops")
    p.add_argument("--no-compiled", action="store_true", help="skip the torch.compile variant (its compile per case)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per blocked_autorange (default: %s)"
                   % MIN_RUN_TIME_S)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Check and time every case, write ``<machine>.json`` and ``.md``, print the markdown."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_ops: --device cuda, but torch.cuda.is_available() is False")
    min_run_time = args.min_run_time or MIN_RUN_TIME_S["quick" if args.quick else "full"]
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES + (CUDA_ONLY_SHAPES if args.device == "cuda" else ()))
    specs = [spec for spec in OPS if args.ops is None or spec.name in args.ops]
    cases = [(spec, shape, dtype) for spec in specs for shape in shapes for dtype in DTYPES]
    slug, name = machine_info(args.device)
    log.info("%s: %d cases, min_run_time %.2f s, %d threads", name, len(cases), min_run_time, torch.get_num_threads())

    torch.manual_seed(0)
    rows = []
    with logging_redirect_tqdm():
        for spec, shape, dtype in tqdm(cases, desc="bench_ops", unit="case"):
            rows.append(run_case(spec, shape, dtype, args.device, min_run_time, not args.no_compiled))

    layout_rows = []
    if args.device == "cuda" and not args.no_layouts:
        specs = {spec.name: spec for spec in OPS}
        layout_cases = [(specs[op], shape, offset, dtype) for op in LAYOUT_OPS
                        for shape, offset in (QUICK_LAYOUT_SHAPES if args.quick else LAYOUT_SHAPES) for dtype in DTYPES]
        with logging_redirect_tqdm():
            for spec, shape, offset, dtype in tqdm(layout_cases, desc="bench_ops layouts", unit="case"):
                layout_rows.append(run_layout_case(spec, shape, dtype, offset, args.device, min_run_time))
                torch.cuda.empty_cache()

    report = {
        "machine": slug, "machine_name": name, "device": args.device, "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "min_run_time_s": min_run_time, "quick": args.quick, "ops": args.ops,
        "cpu_count": os.cpu_count(),
        "tolerances": {"fp32_rtol_atol": FP32_TOL, "bf16_rel": BF16_REL_TOL, "bf16_eager_rel": BF16_EAGER_REL_TOL},
        "results": rows,
        "layouts": layout_rows,
    }
    report["targets"] = evaluate_targets(rows, args.device)
    json_path, md_path = write_report(report, args.out)
    log.info("wrote %s and %s", json_path, md_path)
    print(render_markdown(report))


if __name__ == "__main__":
    main()
