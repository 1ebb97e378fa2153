"""``ater-sweep``: recipes x methods x seeds, then mean +- std beside the paper.

``ater-sweep mnist cifar10 --seeds 0,1,2 --out results/sweep [-- ater-train flags]`` trains every
method of each recipe (``--methods`` to choose) for every seed with ``ater-train --config RECIPE``
into ``OUT/<recipe>/<method>/seed<k>/``, evaluates each run's ``best.pt`` on the test set (the
recipe's ``[eval]``: attack, radius, steps, number of test images, the curve's radii), and writes

* ``OUT/summary.md`` and ``OUT/summary.csv``: per recipe and method, the test error and the robust
  accuracy as mean +- std over the seeds (sample std, n - 1), with the paper's test error (its
  Tables 1 to 4, SPEC section 4) in the next column;
* ``OUT/<recipe>-test-error.png`` (bars with error bars, the paper's values as markers) and
  ``OUT/<recipe>-robustness.png`` (accuracy against radius, mean +- std bands, as ``ater-eval``'s).

Resumable: a finished run is skipped, a killed one continues with ``--resume`` (a run killed
before its first checkpoint starts again), an evaluation already written is reused. Flags after
``--`` go to every ``ater-train`` (``-- --epochs 1 --updates-per-epoch 2`` for a smoke test);
they win over the recipe. ``--print-commands`` prints the ``ater-train`` lines still to run, one
a line, for a cluster scheduler, instead of training; run ``ater-sweep`` again afterwards (or
with ``--aggregate-only``) for the tables. A run folder holding a run of another recipe, method
or seed, or with other settings, is a one-line error naming the folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import robustness
from ..data import load_dataset
from ..models import build_model
from . import plots, recipes, train
from .common import (CliError, load_checkpoint, log, machine_name, pick_device, run_cli, spread_subset, write_csv,
                     write_json, write_text)

# The paper's test errors (%) with their std where given: Tables 1-4 of the ATER paper, keyed by the
# recipes' [recipe] row (SPEC section 4 holds the same means).
PAPER = {
    "MNIST, supervised, MLP": {"erm": (1.11, 0.06), "at": (0.71, 0.03), "vat": (0.64, 0.05), "ater": (0.57, 0.03),
                               "vater": (0.55, 0.02)},
    "CIFAR-10, supervised, conv-large": {"erm": (6.76, 0.07), "at": (5.82, 0.04), "vat": (5.81, 0.05),
                                         "ater": (5.43, 0.05), "vater": (5.20, 0.05)},
    "SVHN, 1000 labels": {"vat": (5.77, 0.32), "vater": (4.92, 0.10)},
    "CIFAR-10, 4000 labels": {"vat": (14.82, 0.38), "vater": (12.53, 0.23)},
}
OWN_FLAGS = ("--config", "--method", "--seed", "--out", "--resume", "--overwrite")  # the sweep sets these
EVAL_DEFAULTS = {"attack": "pgd-l2", "eps": 2.0, "steps": 10, "limit": 1000}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ater-sweep", description=__doc__.splitlines()[0].replace("``", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Flags after -- are passed to every ater-train run.")
    p.add_argument("recipes", nargs="+", metavar="RECIPE",
                   help="recipe files or shipped names: " + ", ".join(recipes.recipe_names()))
    p.add_argument("--methods", default=None, help="comma-separated methods (default: each recipe's row)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--out", default=os.path.join("results", "sweep"), help="sweep folder")
    p.add_argument("--data-dir", default=None, help="passed to ater-train (and to the evaluation)")
    p.add_argument("--device", default=None, help="passed to ater-train; the evaluation runs there too")
    p.add_argument("--print-commands", action="store_true",
                   help="print the ater-train commands still to run instead of running them")
    p.add_argument("--aggregate-only", action="store_true",
                   help="train nothing: evaluate and tabulate the finished runs")
    p.add_argument("--no-eval", action="store_true", help="skip the robust accuracy (tables hold test errors only)")
    p.add_argument("--eval-limit", type=int, default=None, help="test images attacked per run (default: the recipe's)")
    p.add_argument("--quiet", action="store_true", help="passed to ater-train: no per-epoch lines, no bars")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="passed to ater-train, and used by the evaluation: no MD5 check of CIFAR-10 / SVHN files")
    return p


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(sweep's own arguments, ater-train's after ``--``)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _int_list(text: str, what: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise CliError(f"--{what} must list distinct integers, got {text!r}")
    return values


class Run:
    """One (recipe, method, seed) run of the sweep."""

    def __init__(self, recipe: recipes.Recipe, method: str, seed: int, out: str, extra: List[str]):
        self.recipe, self.method, self.seed = recipe, method, seed
        self.dir = os.path.join(out, recipe.name, method, f"seed{seed}")
        self.argv = ["--config", recipe.path, "--method", method, "--seed", str(seed), "--out", self.dir, *extra]
        args, rec = train.parse_args(self.argv)
        self.cfg = train.config_from_args(args, rec)

    def state(self) -> str:
        """``new``, ``restart`` (files but no checkpoint), ``resume`` or ``finished``; a folder of another
        recipe / method / seed or other settings is a one-line error naming it."""
        last = os.path.join(self.dir, "last.pt")
        if os.path.isfile(last):
            ckpt = load_checkpoint(last)
            saved = ckpt["config"]
            self._check_owner(saved.get("recipe", ""), saved.get("method"), saved.get("seed"))
            try:
                train.check_resumable(self.cfg, ckpt, last)
            except CliError as exc:
                raise CliError(f"sweep run {self.dir}: {str(exc).split(': ', 1)[-1]}") from None
            return "finished" if int(ckpt["epoch"]) >= self.cfg.epochs else "resume"
        config = os.path.join(self.dir, "config.toml")
        if os.path.isfile(config):
            import tomllib

            try:
                with open(config, "rb") as f:
                    doc = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise CliError(f"sweep run {self.dir}: cannot read {config} ({exc})") from None
            self._check_owner(doc.get("recipe", {}).get("name", ""), doc.get("train", {}).get("method"),
                              doc.get("train", {}).get("seed"))
            return "restart"
        if os.path.isdir(self.dir) and any(not e.startswith(".") for e in os.listdir(self.dir)):
            return "restart"
        return "new"

    def _check_owner(self, recipe: str, method, seed) -> None:
        if recipe != self.recipe.name:
            raise CliError(f"sweep run {self.dir} holds a run of recipe {recipe or '(none: a plain ater-train run)'}, "
                           f"not {self.recipe.name}; use another --out or remove that folder")
        if method != self.method or seed != self.seed:
            raise CliError(f"sweep run {self.dir} holds a run of method {method}, seed {seed}; "
                           f"expected {self.method}, seed {self.seed}")

    def train_argv(self, state: str) -> List[str]:
        return self.argv + (["--resume"] if state == "resume" else ["--overwrite"] if state == "restart" else [])

    def metrics(self) -> dict:
        with open(os.path.join(self.dir, "metrics.json")) as f:
            return json.load(f)


def _load_best(path: str, data_dir: Optional[str], device: torch.device, verify_checksums: bool):
    """best.pt's model (with its preprocessing layer, grown from the state_dict) in eval mode, and its data."""
    state = load_checkpoint(path)
    cfg = state["config"]
    data = load_dataset(cfg["dataset"], data_dir if data_dir is not None else cfg.get("data_dir"),
                        verify_checksums=verify_checksums)
    model = build_model(cfg["model"], data.input_shape, data.num_classes)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), data


def evaluate_run(run: Run, data_dir: Optional[str], device: torch.device, limit: Optional[int], *,
                 verify_checksums: bool = True) -> dict:
    """The run's robust accuracy (``OUT/.../robust.json``, reused when it matches best.pt's epoch and the
    recipe's [eval])."""
    spec = {**EVAL_DEFAULTS, **run.recipe.eval}
    if limit is not None:
        spec["limit"] = limit
    eps_list = sorted(set(spec.get("eps_list", [])) | {0.0, float(spec["eps"])})
    path = os.path.join(run.dir, "robust.json")
    best = os.path.join(run.dir, "best.pt")
    best_epoch = int(run.metrics()["best_epoch"])
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if (old.get("epoch") == best_epoch and old.get("best_mtime_ns") == os.stat(best).st_mtime_ns
                and old.get("spec") == {**spec, "eps_list": eps_list}):
            return old
    model, data = _load_best(best, data_dir, device, verify_checksums)
    n = min(int(spec["limit"]), len(data.x_test))
    idx = spread_subset(len(data.x_test), n)
    x, y = data.x_test[idx], data.y_test[idx]
    curve = []
    for eps in eps_list:
        acc = robustness.attack_accuracy(model, x, y, spec["attack"], eps, steps=int(spec["steps"]),
                                         device=device)
        curve.append({"eps": eps, "accuracy": acc})
    headline = next(p["accuracy"] for p in curve if p["eps"] == float(spec["eps"]))
    result = {"checkpoint": best, "epoch": best_epoch, "best_mtime_ns": os.stat(best).st_mtime_ns,
              "spec": {**spec, "eps_list": eps_list}, "n_test": n,
              "attack": spec["attack"], "eps": float(spec["eps"]), "robust_accuracy": headline, "curve": curve}
    write_json(path, result)
    return result


def _mean_std(values: List[float]) -> Tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def _pm(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if std != std else f"{mean:.{digits}f} +- {std:.{digits}f}"


def aggregate(runs: List[Run], evals: Dict[str, dict], out: str) -> List[dict]:
    """summary.md / summary.csv and the plots, from the finished runs."""
    rows: List[dict] = []
    groups: Dict[Tuple[str, str], List[Run]] = {}
    for run in runs:
        groups.setdefault((run.recipe.name, run.method), []).append(run)
    for (name, method), members in groups.items():
        recipe = members[0].recipe
        errors, robust, seeds, seconds, cpu = [], [], [], [], []
        for run in members:
            m = run.metrics()
            if not m.get("finished"):
                continue
            best = int(m["best_epoch"])
            errors.append(float(m["epochs"][best - 1]["test_error"]))
            seconds += [float(r["train_seconds"]) for r in m["epochs"]]
            cpu += [float(r["train_cpu_seconds"]) for r in m["epochs"] if "train_cpu_seconds" in r]
            seeds.append(run.seed)
            if run.dir in evals:
                robust.append(float(evals[run.dir]["robust_accuracy"]))
        if not errors:
            continue
        paper = PAPER.get(recipe.row, {}).get(method)
        err_mean, err_std = _mean_std(errors)
        row = {"recipe": name, "row": recipe.row, "method": method, "n": len(errors),
               "seeds": " ".join(map(str, seeds)), "test_error_mean": err_mean, "test_error_std": err_std,
               "paper": paper[0] if paper else "", "paper_std": paper[1] if paper else "",
               "train_seconds_per_epoch": statistics.fmean(seconds),
               "train_cpu_seconds_per_epoch": statistics.fmean(cpu) if cpu else float("nan")}
        if robust:
            spec = {**EVAL_DEFAULTS, **recipe.eval}
            rob_mean, rob_std = _mean_std(robust)
            row.update({"robust_attack": f"{spec['attack']} eps={float(spec['eps']):g}, {spec['steps']} steps",
                        "robust_acc_mean": rob_mean, "robust_acc_std": rob_std})
        rows.append(row)
    write_csv(os.path.join(out, "summary.csv"), rows)
    lines = [f"ater-sweep on {machine_name()} (test error of best.pt, selected on validation, or the last epoch "
             f"without one; mean +- sample std over n seeds; the paper's value +- its std in the next column; "
             f"s/epoch: mean training time of an epoch on this machine, wall clock and process CPU time)", ""]
    header = ["recipe", "method", "n", "test error (%)", "paper (%)", "robust accuracy (%)", "attack", "s/epoch",
              "CPU s/epoch"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        paper = "" if r["paper"] == "" else f"{r['paper']:.2f} +- {r['paper_std']:.2f}"
        robust = _pm(r["robust_acc_mean"], r["robust_acc_std"], 1) if "robust_acc_mean" in r else "-"
        lines.append("| " + " | ".join([r["recipe"], r["method"].upper(), str(r["n"]),
                                         _pm(r["test_error_mean"], r["test_error_std"], 2), paper or "-", robust,
                                         r.get("robust_attack", "-"), f"{r['train_seconds_per_epoch']:.1f}",
                                         f"{r['train_cpu_seconds_per_epoch']:.1f}"]) + " |")
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(out, "summary.md"), text)
    for name in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == name]
        plots.plot_sweep(mine, os.path.join(out, f"{name}-test-error.png"), title=f"{name}: {mine[0]['row']}")
        curves = [_curve_record(run, evals[run.dir]) for run in runs if run.recipe.name == name and run.dir in evals]
        if curves:
            plots.plot_robustness(curves, os.path.join(out, f"{name}-robustness.png"))
    print(text, end="")
    return rows


def _curve_record(run: Run, ev: dict) -> dict:
    """One run's curve in the record format of ater-eval (plots.plot_robustness)."""
    return {"method": run.method, "checkpoint": ev["checkpoint"], "dataset": run.cfg.dataset, "n_test": ev["n_test"],
            "attacks": {ev["attack"]: ev["curve"]}, "pgd": {"steps": ev["spec"]["steps"], "restarts": 1}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, extra = split_argv(argv if argv is not None else __import__("sys").argv[1:])
    args = build_parser().parse_args(own)
    for flag in extra:
        if flag.split("=", 1)[0] in OWN_FLAGS:
            raise CliError(f"ater-sweep sets {flag.split('=', 1)[0]} itself; drop it after --")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise CliError(f"--eval-limit must be >= 1, got {args.eval_limit}")
    seeds = _int_list(args.seeds, "seeds")
    passed = [*(["--data-dir", args.data_dir] if args.data_dir else []),
              *(["--device", args.device] if args.device else []), *(["--quiet"] if args.quiet else []),
              *(["--no-verify-checksums"] if args.no_verify_checksums else []), *extra]
    parser = train.build_parser()
    runs: List[Run] = []
    for spec in args.recipes:
        recipe = recipes.load_recipe(spec, parser, list(train.METHODS))
        methods = recipe.methods if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
        for m in methods:
            if m not in train.METHODS:
                raise CliError(f"--methods: unknown method {m!r} (known: {', '.join(train.METHODS)})")
        runs += [Run(recipe, m, s, args.out, passed) for m in methods for s in seeds]
    states = {run.dir: run.state() for run in runs}  # every folder checked before anything runs
    todo = [run for run in runs if states[run.dir] != "finished"]
    if args.print_commands:
        for run in todo:
            print(shlex.join(["ater-train", *run.train_argv(states[run.dir])]))
        return 0
    if not args.aggregate_only:
        for i, run in enumerate(runs, 1):
            state = states[run.dir]
            if state == "finished":
                log.info("[%d/%d] %s: finished, skipped", i, len(runs), run.dir)
                continue
            log.info("[%d/%d] %s: %s", i, len(runs), run.dir, {"new": "training", "restart": "training again "
                     "(killed before its first checkpoint)", "resume": "resuming"}[state])
            train.main(run.train_argv(state))
    finished = [run for run in runs if os.path.isfile(os.path.join(run.dir, "metrics.json"))
                and run.metrics().get("finished")]
    missing = [run.dir for run in runs if run not in finished]
    if missing:
        log.info("not finished (left out of the tables): %s", ", ".join(missing))
    evals: Dict[str, dict] = {}
    if not args.no_eval and finished:
        device = pick_device(args.device)
        for run in finished:
            evals[run.dir] = evaluate_run(run, args.data_dir, device, args.eval_limit,
                                          verify_checksums=not args.no_verify_checksums)
    os.makedirs(args.out, exist_ok=True)
    aggregate(finished, evals, args.out)
    return 0


def entry_point() -> None:
    raise SystemExit(run_cli("ater-sweep", main))


if __name__ == "__main__":
    entry_point()
