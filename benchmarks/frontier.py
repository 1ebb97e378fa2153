"""Robustness per unit of compute (issue 14): every method trained for the same
epochs on one dataset, over several seeds, evaluated with the project's
strongest evaluation, as a table and a figure of robust and clean accuracy
against training time.

    python benchmarks/frontier.py [--dataset mnist-5k] [--methods erm,at,ater,pgd-at,trades,fgsm-rs]
                                  [--seeds 0,1,2] [--epochs 10] [--aa-norm linf] [--aa-eps 0.1]
                                  [--aa-limit 200] [--runs results/frontier] [--out benchmarks/results]

* Training: ``ater-train`` with each method's defaults (``--eps-adv`` 2.0 in L2
  for AT, ATER, PGD-AT and TRADES; FGSM-RS is L-inf, 0.3 on MNIST-like data),
  ``best.pt`` chosen on the validation split. A finished run in ``--runs`` is
  kept, an interrupted one resumes: the script can be re-run after a kill.
* Evaluation (``ater-eval``, SPEC section 5): AutoAttack's standard version at
  ``--aa-norm`` / ``--aa-eps`` on the first ``--aa-limit`` test images (the
  headline), PGD-Linf and PGD-L2 (10 steps) on the whole test set beside it.
* Cost: training seconds per run, wall clock and process CPU time (the sum
  over the run's threads; the figure other load on the machine disturbs
  least), summed over the epochs.
* Every figure is mean +- std (sample std) over the seeds.

Writes ``frontier-<machine>.json``, ``.md`` and ``.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import machine_info  # noqa: E402
from bench_step import git_commit  # noqa: E402

from ater_ext.atomic_io import save_figure, write_json, write_text  # noqa: E402
from ater_ext.cli import evaluate, train  # noqa: E402

PGD_POINTS = (("pgd-linf", 0.1), ("pgd-l2", 2.0))  # the PGD columns beside AutoAttack
FIGURES = ("clean_acc", "aa_acc", *(f"{a}_{e}_acc" for a, e in PGD_POINTS), "train_seconds", "train_cpu_seconds")


def _finished(run_dir: str, epochs: int) -> bool:
    path = os.path.join(run_dir, "metrics.json")
    if not (os.path.exists(path) and os.path.exists(os.path.join(run_dir, "best.pt"))):
        return False
    with open(path) as f:
        return len(json.load(f)["epochs"]) >= epochs


def train_runs(args, log=print) -> Dict[str, List[str]]:
    """``{method: [run folder per seed]}``, training what is missing (resuming what was cut off)."""
    runs: Dict[str, List[str]] = {}
    for method in args.methods:
        for seed in args.seeds:
            run_dir = os.path.join(args.runs, f"{method}-s{seed}")
            runs.setdefault(method, []).append(run_dir)
            if _finished(run_dir, args.epochs):
                log(f"frontier: {run_dir} is finished, kept")
                continue
            resume = os.path.exists(os.path.join(run_dir, "last.pt"))
            train.main(["--method", method, "--dataset", args.dataset, "--epochs", str(args.epochs),
                        "--seed", str(seed), "--device", args.device, "--out", run_dir,
                        *(["--resume"] if resume else ["--overwrite"]), *args.train_args])
    return runs


def evaluate_runs(args, runs: Dict[str, List[str]]) -> List[dict]:
    """ater-eval's results for every run's best.pt (in ``runs``' order)."""
    checkpoints = [os.path.join(d, "best.pt") for dirs in runs.values() for d in dirs]
    out = os.path.join(args.runs, "eval")
    done = _earlier_evaluation(out, checkpoints, args)
    if done is not None:
        return done
    evaluate.main(["--checkpoint", *checkpoints, "--out", out, "--device", args.device,
                   "--attacks", ",".join(a for a, _ in PGD_POINTS),
                   "--linf-eps-list", f"0,{PGD_POINTS[0][1]}", "--eps-list", f"0,{PGD_POINTS[1][1]}",
                   "--autoattack", "--aa-norm", args.aa_norm, "--aa-eps", str(args.aa_eps),
                   "--aa-limit", str(args.aa_limit), "--energy-samples", "1",
                   *(["--limit", str(args.limit)] if args.limit else [])])
    write_json(os.path.join(out, "frontier-settings.json"), _evaluation_settings(checkpoints, args))
    with open(os.path.join(out, "robustness.json")) as f:
        return json.load(f)["results"]


def _earlier_evaluation(out: str, checkpoints: List[str], args) -> Optional[List[dict]]:
    """The results of an earlier evaluation of exactly these checkpoints with these settings, when
    it is newer than all of them (a re-run after a kill does not evaluate again); else None."""
    path, settings_path = os.path.join(out, "robustness.json"), os.path.join(out, "frontier-settings.json")
    if not (os.path.exists(path) and os.path.exists(settings_path)):
        return None
    with open(settings_path) as f:
        if json.load(f) != _evaluation_settings(checkpoints, args):
            return None
    if os.path.getmtime(path) < max(os.path.getmtime(c) for c in checkpoints):
        return None
    with open(path) as f:
        return json.load(f)["results"]


def _evaluation_settings(checkpoints: List[str], args) -> dict:
    return {"checkpoints": checkpoints, "aa_norm": args.aa_norm, "aa_eps": args.aa_eps, "aa_limit": args.aa_limit,
            "limit": args.limit}


def run_figures(result: dict, run_dir: str) -> Dict[str, float]:
    """One run's figures: accuracies (%) from ater-eval, training seconds from its metrics."""
    acc = {(a, p["eps"]): p["accuracy"] for a, pts in result["attacks"].items() for p in pts}
    with open(os.path.join(run_dir, "metrics.json")) as f:
        rows = json.load(f)["epochs"]
    figures = {"clean_acc": result["clean_accuracy"], "aa_acc": result["autoattack"]["robust_accuracy"],
               "train_seconds": sum(r["train_seconds"] for r in rows),
               "train_cpu_seconds": sum(r.get("train_cpu_seconds", float("nan")) for r in rows)}
    for attack, eps in PGD_POINTS:
        figures[f"{attack}_{eps}_acc"] = acc[(attack, eps)]
    return figures


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


def aggregate(runs: Dict[str, List[str]], results: List[dict]) -> Dict[str, dict]:
    """``{method: {figure: {mean, std}, "runs": [per-seed figures]}}``."""
    by_checkpoint = {r["checkpoint"]: r for r in results}
    table: Dict[str, dict] = {}
    for method, dirs in runs.items():
        per_run = [run_figures(by_checkpoint[os.path.join(d, "best.pt")], d) for d in dirs]
        table[method] = {k: mean_std([r[k] for r in per_run]) for k in FIGURES}
        table[method]["runs"] = per_run
    return table


def _cell(figure: Dict[str, float], digits: int) -> str:
    return f"{figure['mean']:.{digits}f} +- {figure['std']:.{digits}f}"


def render_markdown(report: dict) -> str:
    s = report["settings"]
    head = (["method", "test error (%)", f"AutoAttack {s['aa_norm']} eps={s['aa_eps']} acc (%, n={s['aa_n']})"]
            + [f"{a} eps={e} acc (%)" for a, e in PGD_POINTS] + ["train s (wall)", "train s (CPU)"])
    lines = [f"# Robustness per unit of compute: {report['machine']['name']}", "",
             f"{s['dataset']}, {s['epochs']} epochs per run, seeds {', '.join(map(str, s['seeds']))} (mean +- std), "
             f"device `{s['device']}`, torch {report['machine']['torch']}, commit {report['commit']}, "
             f"{report['date']}. best.pt chosen on the validation split; every accuracy on the test set "
             f"(AutoAttack on its first {s['aa_n']} images, PGD 10 steps on {s['n_test']}). Training time: "
             f"all epochs of a run, without the per-epoch evaluation; CPU = process time over all threads.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, t in report["methods"].items():
        error = {"mean": 100 - t["clean_acc"]["mean"], "std": t["clean_acc"]["std"]}
        cells = [method, _cell(error, 2), _cell(t["aa_acc"], 1),
                 *(_cell(t[f"{a}_{e}_acc"], 1) for a, e in PGD_POINTS),
                 _cell(t["train_seconds"], 1), _cell(t["train_cpu_seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    if s.get("note"):
        lines += ["", s["note"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = report["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    panels = (("aa_acc", f"AutoAttack {s['aa_norm']} eps={s['aa_eps']} accuracy (%, n={s['aa_n']})"),
              ("clean_acc", f"clean test accuracy (%, n={s['n_test']})"))
    for ax, (key, title) in zip(axes, panels):
        for method, t in report["methods"].items():
            ax.errorbar(t["train_cpu_seconds"]["mean"], t[key]["mean"], xerr=t["train_cpu_seconds"]["std"],
                        yerr=t[key]["std"], fmt="o", capsize=3, label=method)
        ax.set_xlabel(f"training CPU seconds ({s['epochs']} epochs)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{s['dataset']}: accuracy against training cost, mean +- std over {len(s['seeds'])} seeds "
                 f"({report['machine']['name']})", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    save_figure(fig, path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist-5k")
    p.add_argument("--methods", default="erm,at,ater,pgd-at,trades,fgsm-rs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--aa-norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--aa-eps", type=float, default=0.1)
    p.add_argument("--aa-limit", type=int, default=200)
    p.add_argument("--limit", type=int, default=None, help="PGD and clean figures on N test images (default all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", default=os.path.join("results", "frontier"), help="training runs and evaluation")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="report folder")
    p.add_argument("--note", default="", help="a sentence for the report (e.g. the load on the machine)")
    p.add_argument("--train-args", default="", help="extra ater-train options, space-separated (tests)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in train.METHODS]
    if unknown or not args.methods:
        raise SystemExit(f"frontier.py: --methods must be among {', '.join(train.METHODS)}, got {unknown or 'none'}")
    args.seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    args.train_args = args.train_args.split()
    started = time.perf_counter()
    runs = train_runs(args)
    results = evaluate_runs(args, runs)
    slug, machine = machine_info(args.device)
    report = {"machine": {"name": machine, "torch": torch.__version__}, "commit": git_commit(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": {"dataset": args.dataset, "epochs": args.epochs, "seeds": args.seeds,
                           "device": args.device, "aa_norm": args.aa_norm, "aa_eps": args.aa_eps,
                           "aa_n": results[0]["autoattack"]["n"], "n_test": results[0]["n_test"],
                           "note": args.note},
              "methods": aggregate(runs, results), "seconds": time.perf_counter() - started}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"frontier-{slug}")
    write_json(stem + ".json", report)
    write_text(stem + ".md", render_markdown(report))
    plot(report, stem + ".png")
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    main()
