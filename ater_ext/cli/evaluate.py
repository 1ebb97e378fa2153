"""``ater-eval``: robustness of trained checkpoints.

For each checkpoint: clean test accuracy, accuracy under FGSM, PGD-L2 and
PGD-Linf over a list of perturbation sizes (model in eval mode, inputs kept in
[0, 1]), and the Monte-Carlo energy ``E_B / Vol(B)`` and ``E_eps``. Writes
``robustness.json``, ``robustness.csv`` and ``robustness.png`` (accuracy against
perturbation size, one panel per attack, one curve per checkpoint: the paper's
Fig. 2) under ``--out``.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Sequence

import torch

from .. import attacks, metrics
from ..data import load_dataset
from ..models import build_model
from .common import (CliError, float_list, load_checkpoint, machine_name, pick_device, positive_float, positive_int,
                     progress, run_cli, spread_subset, write_csv, write_json)
from .plots import plot_robustness

ATTACKS = {"fgsm": attacks.fgsm, "pgd-l2": attacks.pgd_l2, "pgd-linf": attacks.pgd_linf}
L2_ATTACKS = ("pgd-l2",)
DEFAULT_L2_EPS = "0,0.5,1,1.5,2,2.5,3"
DEFAULT_LINF_EPS = "0,0.05,0.1,0.15,0.2,0.25,0.3"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ater-eval", description="Evaluate robustness of ater-train checkpoints.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="FILE", help="one or more .pt files from ater-train")
    p.add_argument("--attacks", default="fgsm,pgd-l2,pgd-linf", help="comma-separated: " + ", ".join(ATTACKS))
    p.add_argument("--eps-list", type=float_list, default=float_list(DEFAULT_L2_EPS),
                   help="perturbation sizes of the L2 attack (pgd-l2)")
    p.add_argument("--linf-eps-list", type=float_list, default=float_list(DEFAULT_LINF_EPS),
                   help="perturbation sizes of the L-inf attacks (fgsm, pgd-linf)")
    p.add_argument("--steps", type=positive_int, default=10, help="PGD iterations")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate on a fixed random subset of N test samples (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=500, help="evaluation batch size")
    p.add_argument("--energy-samples", type=positive_int, default=16, help="Monte-Carlo samples per point for the energy")
    p.add_argument("--energy-eps", type=positive_float, default=None, help="energy radius (default: the checkpoint's --eps)")
    p.add_argument("--data-dir", default=None, help="dataset root, when it differs from the checkpoint's")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out", default="results/eval", help="output directory")
    return p


def parse_attacks(text: str) -> List[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if not names or unknown:
        raise CliError(f"--attacks: unknown attack(s) {unknown or text!r}; choose from {', '.join(ATTACKS)}")
    return names


def load_model(state: dict, device: torch.device):
    cfg = state["config"]
    data = load_dataset(cfg["dataset"], cfg.get("data_dir"))
    model = build_model(cfg["model"], data.input_shape, data.num_classes)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), data


def accuracy_under(model, attack: Optional[str], eps: float, x: torch.Tensor, y: torch.Tensor, device,
                   batch: int, steps: int) -> float:
    """Accuracy (%) on x, y after the attack at size eps (clean when eps == 0)."""
    correct = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        if eps > 0:
            kwargs = {} if attack == "fgsm" else {"steps": steps}
            xb = ATTACKS[attack](model, xb, yb, eps, clamp=(0.0, 1.0), **kwargs)
        with torch.no_grad():
            correct += int((model(xb).argmax(1) == yb).sum())
    return 100.0 * correct / len(x)


def evaluate_checkpoint(path: str, args, attack_names: List[str], device) -> Dict[str, object]:
    state = load_checkpoint(path)
    if args.data_dir is not None:
        state["config"]["data_dir"] = args.data_dir
    model, data = load_model(state, device)
    n = len(data.x_test) if args.limit is None else min(args.limit, len(data.x_test))
    idx = spread_subset(len(data.x_test), n)  # a fixed subset that spans the classes
    x, y = data.x_test[idx], data.y_test[idx]
    cfg = state["config"]
    result: Dict[str, object] = {"checkpoint": path, "method": cfg["method"], "dataset": cfg["dataset"],
                                 "model": cfg["model"], "epoch": int(state["epoch"]), "n_test": n}
    result["clean_accuracy"] = accuracy_under(model, None, 0.0, x, y, device, args.batch_size, args.steps)
    curves: Dict[str, List[Dict[str, float]]] = {}
    jobs = [(a, e) for a in attack_names for e in (args.eps_list if a in L2_ATTACKS else args.linf_eps_list)]
    with progress(jobs, desc=os.path.basename(path)) as bar:
        for attack, eps in bar:
            acc = result["clean_accuracy"] if eps == 0 else accuracy_under(model, attack, eps, x, y, device,
                                                                           args.batch_size, args.steps)
            curves.setdefault(attack, []).append({"eps": eps, "accuracy": acc})
    result["attacks"] = curves
    energy_eps = args.energy_eps or float(cfg["eps"])
    m = min(n, 500)  # x is already a spread subset, so its first m samples span the classes
    gen = torch.Generator(device=device).manual_seed(0)
    energy = metrics.energy(model, x[:m].to(device), y[:m].to(device), energy_eps,
                            n_samples=args.energy_samples, generator=gen)
    result["energy"] = {"eps": energy_eps, "n_points": m, "E_B": float(energy["E_B"]),
                        "E_eps": float(energy["E_eps"])}
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    attack_names = parse_attacks(args.attacks)
    device = pick_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    results = [evaluate_checkpoint(path, args, attack_names, device) for path in args.checkpoint]
    write_json(os.path.join(args.out, "robustness.json"), {"machine": machine_name(), "results": results})
    rows = [{"checkpoint": r["checkpoint"], "method": r["method"], "attack": attack, "eps": point["eps"],
             "accuracy": point["accuracy"]}
            for r in results for attack, points in r["attacks"].items() for point in points]
    write_csv(os.path.join(args.out, "robustness.csv"), rows)
    plot_robustness(results, os.path.join(args.out, "robustness.png"))
    for r in results:
        print(f"{r['checkpoint']}: clean accuracy {r['clean_accuracy']:.2f} %, "
              f"E_B/Vol {r['energy']['E_B']:.4g}, E_eps {r['energy']['E_eps']:.4g}")
    return 0


def entry_point() -> None:
    raise SystemExit(run_cli("ater-eval", main))


if __name__ == "__main__":
    entry_point()
