"""Scaling of the fused ops: time and bandwidth of ``fd_direction`` and
``normalized_step`` (fp32, preallocated ``out=``) as the batch B and the row
length D grow, checked against ``ater_ext.reference`` before timing.

    python benchmarks/bench_scaling.py [--device cpu|cuda] [--layout rows|adaptive] [--out benchmarks/results]

Writes ``scaling-<machine>.json`` and ``.md`` (``scaling-<machine>-adaptive.*``
for ``--layout adaptive``, the CUDA kernel layout of
``ater_ext.ops.set_cuda_layout``), atomically. The training step's scaling
with B is in ``bench_step.py``'s table.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import OPS, assert_matches_reference, machine_info, make_inputs, measure  # noqa: E402

from ater_ext import ops  # noqa: E402
from ater_ext.atomic_io import write_json, write_text  # noqa: E402

BATCHES = (32, 128, 512, 2048, 8192)
ROW_LENGTHS = (784, 3072, 12288)


SPECS = {spec.name: spec for spec in OPS}


def case(op: str, batch: int, d: int, device: str, min_run_time: float) -> dict:
    """``op``'s fused ``out=`` variant at ``[batch, d]`` fp32: checked against the reference, then timed."""
    spec = SPECS[op]
    tensors, scalars = make_inputs(spec, (batch, d), torch.float32, device)
    out = torch.empty_like(tensors[0])
    run = functools.partial(spec.fused, *tensors, *scalars, out=out)
    run()
    assert_matches_reference(f"{op} [{batch}, {d}]", out, spec.reference(*tensors, *scalars), spec.magnitude(tensors))
    seconds = measure(run, min_run_time).median
    nbytes = spec.traffic * out.numel() * out.element_size()
    return {"op": op, "B": batch, "D": d, "seconds": seconds, "GBps": nbytes / seconds / 1e9}


def markdown(report: dict) -> str:
    lines = [f"# ater_ext op scaling: {report['machine_name']}", "",
             f"device `{report['device']}`, torch {report['torch']}, {report['threads']} threads, {report['date']}; "
             + (f"CUDA kernel layout `{report['layout']}`; " if report["device"] == "cuda" else "")
             + "fp32, preallocated `out=`, median µs (GB/s = bytes read + written / time).", ""]
    for op in ("fd_direction", "normalized_step"):
        lines += [f"## {op}", "", "| B \\\\ D | " + " | ".join(str(d) for d in ROW_LENGTHS) + " |",
                  "|---|" + "---|" * len(ROW_LENGTHS)]
        for batch in BATCHES:
            cells = []
            for d in ROW_LENGTHS:
                r = next(r for r in report["rows"] if r["op"] == op and r["B"] == batch and r["D"] == d)
                cells.append(f"{r['seconds'] * 1e6:.1f} µs ({r['GBps']:.0f} GB/s)")
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--layout", choices=ops.CUDA_LAYOUTS, default="rows", help="CUDA kernel layout to time")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_scaling: --device cuda, but torch.cuda.is_available() is False")
    jobs = [(op, b, d) for op in ("fd_direction", "normalized_step") for b in BATCHES for d in ROW_LENGTHS]
    with ops.cuda_layout(args.layout):
        rows = [case(op, b, d, args.device, args.min_run_time) for op, b, d in tqdm(jobs, desc="scaling")]
    slug, name = machine_info(args.device)
    report = {"machine_name": name, "device": args.device, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "layout": args.layout,
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"scaling-{slug}" + ("-adaptive" if args.layout == "adaptive" else "")
    write_json(str(args.out / f"{stem}.json"), report)
    write_text(str(args.out / f"{stem}.md"), markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
