"""``ater-eval``: robustness of trained checkpoints (or of any model a factory
builds), following SPEC section 5.

For each model: clean test accuracy; accuracy under FGSM, PGD-L2 and PGD-Linf
over lists of radii (the paper's Fig. 2; PGD with optional random start and
restarts, a point counting as robust only if every restart fails); the
Monte-Carlo energy ``E_B / Vol(B)`` and ``E_eps``; with ``--autoattack``,
AutoAttack's standard version (the headline figure) with its per-attack
breakdown and time; with ``--masking-report``, the gradient-masking checks of
:mod:`ater_ext.masking`. Writes under ``--out``: ``robustness.json``,
``robustness.csv``, ``robustness.png``, and ``masking.json`` / ``masking.md``.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import masking, metrics, robustness
from .common import (CliError, float_list, machine_name, pick_device, positive_float, positive_int, progress,
                     run_cli, spread_subset, write_csv, write_json, write_text)
from .plots import plot_robustness
from .targets import Target, check_target, from_checkpoint, from_factory

ATTACKS = tuple(robustness.ATTACKS)
DEFAULT_L2_EPS = "0,0.5,1,1.5,2,2.5,3"
DEFAULT_LINF_EPS = "0,0.05,0.1,0.15,0.2,0.25,0.3"
DEFAULT_AA_LINF_EPS = 0.1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ater-eval", description="Evaluate the robustness of ater-train checkpoints "
                                "or of any model (SPEC section 5: AutoAttack beside PGD, a gradient-masking report).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("models")
    src.add_argument("--checkpoint", nargs="+", default=[], metavar="FILE", help="one or more .pt files from ater-train")
    src.add_argument("--model-factory", default=None, metavar="MODULE:FUNCTION",
                     help="evaluate the nn.Module that MODULE.FUNCTION(**--factory-kwargs) returns (needs --dataset)")
    src.add_argument("--factory-kwargs", default=None, metavar="JSON", help="keyword arguments of the factory")
    src.add_argument("--weights", default=None, metavar="FILE",
                     help="state dict for the factory's model (read with weights_only=True)")
    src.add_argument("--dataset", default=None, help="the factory model's dataset (its test split is used)")
    src.add_argument("--label", default=None, help="the factory model's name in the reports")
    src.add_argument("--output", default=None, metavar="KEY|INDEX",
                     help="where the factory model's output holds the logits: a key ({'logits': ...}, a Hugging "
                          "Face ModelOutput) or an index (a tuple)")
    atk = p.add_argument_group("PGD / FGSM curves")
    atk.add_argument("--attacks", default="fgsm,pgd-l2,pgd-linf", help="comma-separated: " + ", ".join(ATTACKS))
    atk.add_argument("--eps-list", type=float_list, default=float_list(DEFAULT_L2_EPS),
                     help="perturbation sizes of the L2 attack (pgd-l2)")
    atk.add_argument("--linf-eps-list", type=float_list, default=float_list(DEFAULT_LINF_EPS),
                     help="perturbation sizes of the L-inf attacks (fgsm, pgd-linf)")
    atk.add_argument("--steps", type=positive_int, default=10, help="PGD iterations")
    atk.add_argument("--step-size", type=positive_float, default=None,
                     help="PGD step length (default: 2.5 * eps / steps, Madry et al.)")
    atk.add_argument("--random-start", action="store_true", help="start PGD at a uniform random point of the ball")
    atk.add_argument("--restarts", type=positive_int, default=1,
                     help="PGD runs per point, each from a random start when > 1; worst case per point")
    aa = p.add_argument_group("AutoAttack and the gradient-masking report")
    aa.add_argument("--autoattack", action="store_true",
                    help="AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square; pyautoattack)")
    aa.add_argument("--aa-norm", choices=robustness.NORMS, default="linf", help="threat model of AutoAttack and the report")
    aa.add_argument("--aa-eps", type=positive_float, default=None,
                    help=f"radius of AutoAttack and the report (default: the checkpoint's --eps-adv when it was "
                         f"trained in --aa-norm, else {DEFAULT_AA_LINF_EPS} for linf)")
    aa.add_argument("--aa-limit", type=positive_int, default=None,
                    help="AutoAttack and the report on the first N evaluation points (default: --limit's)")
    aa.add_argument("--masking-report", action="store_true", help="run the gradient-masking checks (masking.json, .md)")
    aa.add_argument("--surrogate", default=None, metavar="FILE",
                    help="checkpoint whose PGD examples the report transfers (e.g. the ERM model)")
    aa.add_argument("--square-queries", type=positive_int, default=5000,
                    help="queries of the report's Square attack when AutoAttack is not run")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate on a fixed random subset of N test samples (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=500, help="evaluation batch size")
    p.add_argument("--data-range", default="0,1", metavar="LO,HI",
                   help="the inputs' value range; attacks clip to it (AutoAttack needs 0,1)")
    p.add_argument("--energy-samples", type=positive_int, default=16, help="Monte-Carlo samples per point for the energy")
    p.add_argument("--energy-eps", type=positive_float, default=None, help="energy radius (default: the checkpoint's --eps; 2.0 for factory models)")
    p.add_argument("--seed", type=int, default=0, help="seed of random starts and of AutoAttack")
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


def parse_range(text: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise CliError(f"--data-range must be LO,HI, got {text!r}") from None
    if not (lo < hi) or any(v != v or abs(v) == float("inf") for v in (lo, hi)):
        raise CliError(f"--data-range needs finite LO < HI, got {text!r}")
    return lo, hi


def check_args(args) -> None:
    for name in ("weights", "factory_kwargs", "label", "dataset", "output"):
        if getattr(args, name) is not None and not args.model_factory:
            raise CliError(f"--{name.replace('_', '-')} belongs to --model-factory")
    if not args.checkpoint and not args.model_factory:
        raise CliError("give --checkpoint FILE [FILE ...] or --model-factory MODULE:FUNCTION")
    if args.surrogate and not args.masking_report:
        raise CliError("--surrogate is used by --masking-report; add it or drop --surrogate")
    if (args.autoattack or args.masking_report) and args.data_range_parsed != (0.0, 1.0):
        raise CliError(f"--autoattack / --masking-report work in [0, 1] pixel space, got --data-range {args.data_range}; "
                       f"put the normalisation inside the model")


def pgd_settings(args) -> Dict[str, object]:
    """How the PGD curves were made, as written into the result files."""
    return {"steps": args.steps, "step_size": args.step_size if args.step_size else "2.5 * eps / steps",
            "random_start": bool(args.random_start or args.restarts > 1), "restarts": args.restarts,
            "seed": args.seed}


def aa_radius(args, target: Target) -> float:
    if args.aa_eps is not None:
        return args.aa_eps
    radius = target.info.get("train_eps_adv") if target.info.get("train_norm", "l2") == args.aa_norm else None
    if radius is not None:
        return float(radius)  # the radius the model was trained at, in that norm
    if args.aa_norm == "linf":
        return DEFAULT_AA_LINF_EPS
    raise CliError(f"{target.label}: --aa-eps is needed for --aa-norm l2 (no L2 training radius known)")


def curves(target: Target, args, names: List[str], x, y, device) -> Dict[str, List[Dict[str, float]]]:
    clean = robustness.attack_accuracy(target.model, x, y, "fgsm", 0.0, batch_size=args.batch_size, device=device)
    jobs = [(a, e) for a in names for e in (args.eps_list if robustness.ATTACKS[a][1] == "l2" else args.linf_eps_list)]
    result: Dict[str, List[Dict[str, float]]] = {}
    with progress(jobs, desc=os.path.basename(target.label)) as bar:
        for attack, eps in bar:
            acc = clean if eps == 0 else robustness.attack_accuracy(
                target.model, x, y, attack, eps, steps=args.steps, step_size=args.step_size,
                restarts=args.restarts, random_start=args.random_start, clamp=args.data_range_parsed,
                batch_size=args.batch_size, seed=args.seed, device=device)
            result.setdefault(attack, []).append({"eps": eps, "accuracy": acc})
    return result


def evaluate_target(target: Target, args, names: List[str], device, surrogate: Optional[Target]
                    ) -> Tuple[Dict[str, object], Optional[masking.MaskingReport]]:
    """The model's result record and, with --masking-report, its report."""
    start = time.perf_counter()
    check_target(target, device)
    data = target.data
    n = len(data.x_test) if args.limit is None else min(args.limit, len(data.x_test))
    idx = spread_subset(len(data.x_test), n)  # a fixed subset that spans the classes
    x, y = data.x_test[idx], data.y_test[idx]
    try:
        robustness.check_data_range("ater-eval", x, args.data_range_parsed)
    except ValueError as exc:
        raise CliError(f"{target.label}: {str(exc).split(': ', 1)[-1]}") from None
    result: Dict[str, object] = {**target.info, "label": target.label, "n_test": n, "pgd": pgd_settings(args)}
    result["clean_accuracy"] = robustness.attack_accuracy(target.model, x, y, "fgsm", 0.0,
                                                          batch_size=args.batch_size, device=device)
    result["attacks"] = curves(target, args, names, x, y, device)
    energy_eps = args.energy_eps or float(target.info.get("train_eps") or 2.0)
    m = min(n, 500)  # x is already a spread subset, so its first m samples span the classes
    gen = torch.Generator(device=device).manual_seed(0)
    energy = metrics.energy(target.model, x[:m].to(device), y[:m].to(device), energy_eps,
                            n_samples=args.energy_samples, generator=gen)
    result["energy"] = {"eps": energy_eps, "n_points": m, "E_B": float(energy["E_B"]), "E_eps": float(energy["E_eps"])}
    aa_result, report = None, None
    if args.autoattack or args.masking_report:
        eps = aa_radius(args, target)
        k = min(n, args.aa_limit or n)
        xa, ya = x[:k], y[:k]
        if args.autoattack:
            aa_result = robustness.autoattack(target.model, xa, ya, norm=args.aa_norm, eps=eps,
                                              batch_size=args.batch_size, seed=args.seed, device=device)
            result["autoattack"] = aa_result.to_dict()
        if args.masking_report:
            report = masking.masking_report(target.model, xa, ya, norm=args.aa_norm, eps=eps,
                                            surrogate=surrogate.model if surrogate else None, autoattack=aa_result,
                                            restarts=max(args.restarts, 5), square_queries=args.square_queries,
                                            batch_size=args.batch_size, seed=args.seed, device=device)
            result["masking"] = {**report.to_dict(), "surrogate": surrogate.label if surrogate else None}
    result["seconds"] = time.perf_counter() - start
    return result, report


def csv_rows(results: List[dict]) -> List[Dict[str, object]]:
    rows = []
    for r in results:
        pgd = r["pgd"]
        for attack, points in r["attacks"].items():
            norm = robustness.ATTACKS[attack][1]
            iterative = robustness.ATTACKS[attack][2]
            for point in points:
                rows.append({"checkpoint": r["checkpoint"], "method": r["method"], "attack": attack, "norm": norm,
                             "eps": point["eps"], "accuracy": point["accuracy"],
                             "steps": pgd["steps"] if iterative else 1,
                             "restarts": pgd["restarts"] if iterative else 1, "n": r["n_test"]})
        if "autoattack" in r:
            aa = r["autoattack"]
            rows.append({"checkpoint": r["checkpoint"], "method": r["method"], "attack": f"autoattack-{aa['version']}",
                         "norm": aa["norm"], "eps": aa["eps"], "accuracy": aa["robust_accuracy"], "steps": "",
                         "restarts": "", "n": aa["n"]})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    names = parse_attacks(args.attacks)
    args.data_range_parsed = parse_range(args.data_range)
    check_args(args)
    device = pick_device(args.device)
    targets = [from_checkpoint(path, args.data_dir, device) for path in args.checkpoint]
    if args.model_factory:
        targets.append(from_factory(args.model_factory, args.weights, args.factory_kwargs, args.dataset,
                                    args.data_dir, args.label, device, args.output))
    surrogate = from_checkpoint(args.surrogate, args.data_dir, device) if args.surrogate else None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CliError(f"--out {args.out} exists and is not a folder")
    os.makedirs(args.out, exist_ok=True)
    evaluated = [evaluate_target(t, args, names, device, surrogate) for t in targets]
    results = [r for r, _ in evaluated]
    reports = {r["label"]: report for r, report in evaluated if report is not None}
    write_json(os.path.join(args.out, "robustness.json"), {"machine": machine_name(), "torch": torch.__version__,
                                                           "results": results})
    write_csv(os.path.join(args.out, "robustness.csv"), csv_rows(results))
    plot_robustness(results, os.path.join(args.out, "robustness.png"))
    if reports:
        write_json(os.path.join(args.out, "masking.json"), {label: r.to_dict() for label, r in reports.items()})
        write_text(os.path.join(args.out, "masking.md"), masking.render_markdown(reports))
    for r in results:
        line = (f"{r['label']}: clean accuracy {r['clean_accuracy']:.2f} %, E_B/Vol {r['energy']['E_B']:.4g}, "
                f"E_eps {r['energy']['E_eps']:.4g}")
        if "autoattack" in r:
            aa = r["autoattack"]
            line += f", AutoAttack {aa['norm']} eps={aa['eps']:g}: {aa['robust_accuracy']:.2f} % ({aa['seconds']:.0f} s)"
        if "masking" in r:
            line += f", masking report: {r['masking']['verdict']}"
        print(line)
    return 0


def entry_point() -> None:
    raise SystemExit(run_cli("ater-eval", main))


if __name__ == "__main__":
    entry_point()
