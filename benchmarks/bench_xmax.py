"""The x_max study over models, training states and precisions (issue 11).

For each case (a model, in a state: at initialisation or an ater-train
checkpoint) and each precision (fp32, bf16 autocast, fp64), runs
:func:`ater_ext.xmax_study.study_x_max` on a fixed subset of the test set, with
the model in train mode (as ATER sees it during training: batch-statistics
BatchNorm), and writes the gradient norm each maximiser reaches as a fraction of
the reference, its direction's cosine to the exact HVP and its cost (counted
forward-equivalents; wall and CPU seconds of one run)::

    python benchmarks/bench_xmax.py --runs /tmp/xmax/erm-mlp-mnist-5k ... \\
        --init mlp:mnist-5k lenet:digits conv-large:mnist-5k resnet18:mnist-5k [--batch 64] [--quick]

``--train-comparison``: instead, "does it matter for training?": ERM, AT, ATER
(the paper's one-step FD) and ATER with the best maximiser of the study
(``--best-direction``, ``--best-steps``; default ``hvp``, 4 steps) trained on
mnist-5k with the paper MLP for ``--epochs`` epochs and ``--seeds`` seeds, all
in the same plain loop (Adam, lr 1e-3, batch 100, seeded order); reports test
error, PGD-L2 accuracy (eps 2.0, 10 steps, 500 test images), the training-time
quality ratio ``train_xmax_grad_ratio`` (ATER runs), the ratio the paper's
one-step FD reaches on the final model (every method, 500 test images, train
mode) and the time per epoch, mean +- std over seeds; writes
``xmax-train-<machine>.json`` / ``.md``.

``--runs``: ater-train output folders (``best.pt`` is read; the method and
dataset come from its config). ``--init MODEL:DATASET``: a freshly initialised
model (seed 0); ``resnet18`` is torchvision's ResNet-18 (10 classes) on the
grey images repeated to 3 channels. ``--train MODEL:DATASET:METHOD`` (METHOD
``erm`` or ``ater``): that initialised model trained here first, in the same
plain loop as the training comparison (:func:`fit`), for ``--train-epochs``
epochs on ``--train-subset`` training images; the weights are kept under
``--train-dir`` (default ``$TMPDIR/bench_xmax_train``, never the repository)
and reused, and each such case records how it was trained (``training``:
epochs, images, test error at init and trained, seconds per epoch)::

    python benchmarks/bench_xmax.py --merge --train conv-large:mnist-5k:erm resnet18:mnist-5k:ater \
        --train-epochs 2 --train-subset 2000 --fp64-big

Writes ``xmax-<machine>.json`` and ``.md`` to ``--out`` (default
``benchmarks/results``; ``--results PATH.json`` names the file instead),
through ``ater_ext.atomic_io``; ``--merge`` adds the cases to the file already
there (replacing a case of the same model, dataset and state) and appends this
run (machine, date, load, command, cases) to its ``runs``, which the
markdown's header lists; ``--merge-from A.json ...`` runs nothing and merges
those files' cases and runs into ``--results`` the same way (e.g. cases
measured on another machine: each run names its machine).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import machine_info  # noqa: E402  (the results files' machine slug, as the other benchmarks)

from ater_ext.atomic_io import write_json, write_text
from ater_ext.cli.common import machine_name, spread_subset
from ater_ext.data import load_dataset
from ater_ext.models import build_model
from ater_ext.xmax_study import DEFAULT_STEPS, DEFAULT_XIS, PRECISIONS, study_x_max

STATE_NAMES = {"erm": "ERM-trained", "ater": "ATER-trained", "at": "AT-trained", "vat": "VAT-trained",
               "vater": "VATER-trained"}
TRAIN_METHODS = ("erm", "ater")  # what --train trains
BIG = ("conv-large", "resnet18")  # the expensive models get the smaller batch


class Grey3(nn.Module):
    """torchvision's ResNet-18 on 1-channel images, repeated to 3 channels."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def init_model(name: str, data) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision
        return Grey3(torchvision.models.resnet18(num_classes=data.num_classes))
    return build_model(name, data.input_shape, data.num_classes)


def load_run(folder: str) -> Tuple[str, str, str, nn.Module, object, float, Optional[dict]]:
    from ater_ext.cli.targets import from_checkpoint
    target = from_checkpoint(os.path.join(folder, "best.pt"), None, torch.device("cpu"))
    info = target.info
    eps = float(info.get("train_eps") or 2.0)
    state = STATE_NAMES.get(info["method"], info["method"])
    return info["model"], info["dataset"], state, target.model, target.data, eps, None


def train_case(spec: str, args) -> Tuple[str, str, str, nn.Module, object, float, dict]:
    """``--train MODEL:DATASET:METHOD``: the model of :func:`init_model` (seed 0) trained
    by :func:`fit` (seed 0) for ``args.train_epochs`` epochs on ``args.train_subset``
    training images (all when ``None``) with ERM or ATER (default settings, eps 2.0).
    The weights are kept in ``args.train_dir`` (outside the repository) and reused
    by a later call with the same spec, epochs and subset. Returns the case and
    how it was trained (``training``: epochs, images, test error at init and trained, ...)."""
    from ater_ext.atomic_io import save_torch
    parts = spec.split(":")
    if len(parts) != 3 or parts[2] not in TRAIN_METHODS:
        raise SystemExit(f"bench_xmax: --train wants MODEL:DATASET:METHOD with METHOD in {TRAIN_METHODS}, "
                         f"got {spec!r}")
    model_name, dataset, method = parts
    data = load_dataset(dataset)
    model = init_model(model_name, data)
    images = len(data.x_train) if args.train_subset is None else min(args.train_subset, len(data.x_train))
    path = os.path.join(args.train_dir, f"{model_name}-{dataset}-{method}-e{args.train_epochs}-n{images}-s0.pt")
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        training = {**saved["training"], "reused_checkpoint": path}
    else:
        init_error = test_error(model, data)
        epoch_seconds, ratios = fit(model, data, make_objective(method, model), args.train_epochs, seed=0,
                                    train_images=images)
        training = {"method": method, "loop": "Adam lr 1e-3, batch 100, seed 0" +
                    (", ater_loss defaults (eps = eps_adv = 2.0, lam 0.1, one-step FD)" if method == "ater" else ""),
                    "epochs": args.train_epochs, "train_images": images, "test_images": len(data.x_test),
                    "init_test_error": init_error, "test_error": test_error(model, data),
                    "epoch_seconds": epoch_seconds,
                    "train_xmax_grad_ratio": sum(ratios) / len(ratios) if ratios else float("nan"),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
                    "cpu_load": [round(v, 2) for v in os.getloadavg()]}
        os.makedirs(args.train_dir, exist_ok=True)
        save_torch(path, {"state_dict": model.state_dict(), "training": training})
    tqdm.write(f"trained {spec}: {training}")
    return model_name, dataset, STATE_NAMES[method], model, data, 2.0, training


def cases(args) -> List[Tuple[str, str, str, nn.Module, object, float, Optional[dict]]]:
    out = [load_run(folder) for folder in args.runs]
    out += [train_case(spec, args) for spec in args.train]
    for spec in args.init:
        model_name, _, dataset = spec.partition(":")
        data = load_dataset(dataset)
        out.append((model_name, dataset, "init", init_model(model_name, data), data, 2.0, None))
    return out


def run_case(model: nn.Module, data, model_name: str, eps: float, args) -> Dict[str, dict]:
    batch = args.big_batch if model_name in BIG else args.batch
    idx = spread_subset(len(data.x_test), batch, seed=1)
    x32, y = data.x_test[idx].float(), data.y_test[idx]
    model = model.float().train()
    results = {}
    precisions = [p for p in args.precisions if not (p == "fp64" and model_name in BIG and not args.fp64_big)]
    for precision in [p for p in precisions if p != "bf16"]:
        m, x = (copy.deepcopy(model).double(), x32.double()) if precision == "fp64" else (model, x32)
        xis = (1e-6,) + tuple(DEFAULT_XIS) if precision == "fp64" else DEFAULT_XIS
        results[precision] = study_x_max(m, x, y, eps=eps, precision=precision, xis=xis,
                                         steps=args.steps, reference_iters=args.reference_iters,
                                         time_runs=precision == "fp32", also_bf16=precision == "fp32" and
                                         "bf16" in precisions)
    if "bf16" in precisions:
        # the maximisers run in fp32 under bf16 autocast (SPEC): the fp32 points, evaluated by a bf16 penalty
        r32 = results["fp32"]
        results["bf16"] = {**r32, "precision": "bf16",
                           "methods": [{**r, "grad_norm": r["grad_norm_bf16"], "fraction": r["fraction_bf16"]}
                                       for r in r32["methods"]]}
    return results


def fmt(v: float, digits: int = 2) -> str:
    return "-" if v != v else f"{v:.{digits}f}"


def case_label(case: dict) -> str:
    return f"{case['model']}/{case['dataset']}/{case['state']}"


def runs_of(report: dict) -> List[dict]:
    """The runs that measured a results file's cases (a file written before runs were
    recorded: one run, from its top-level fields, command not recorded)."""
    if "runs" in report:
        return [{"machine": report.get("machine"), **r} for r in report["runs"]]
    return [{**{key: report.get(key) for key in ("machine", "date", "torch", "omp_threads", "cpus", "load_before",
                                                  "load_after", "seconds")},
             "argv": None, "cases": [case_label(c) for c in report["cases"]]}]


def merge_reports(base: Optional[dict], new: dict) -> dict:
    """``base``'s cases and runs followed by ``new``'s; a case of ``new`` replaces ``base``'s
    case of the same model, dataset and state (the earlier run lists it as ``superseded``).
    The top-level fields are ``new``'s."""
    if base is None:
        return {**new, "runs": runs_of(new)}
    labels = {case_label(c) for c in new["cases"]}
    runs = []
    for r in runs_of(base):
        gone = [label for label in r["cases"] if label in labels]
        runs.append({**r, "cases": [label for label in r["cases"] if label not in labels],
                     **({"superseded": r.get("superseded", []) + gone} if gone else {})})
    return {**new, "cases": [c for c in base["cases"] if case_label(c) not in labels] + new["cases"],
            "runs": runs + runs_of(new)}


def machines(report: dict) -> List[str]:
    return list(dict.fromkeys(r["machine"] for r in runs_of(report)))


def coverage(report: dict) -> str:
    """Which states and precisions each model has, e.g. ``conv-large: init on mnist-5k (fp32, bf16)``."""
    parts = []
    for model in dict.fromkeys(c["model"] for c in report["cases"]):
        groups: Dict[Tuple[str, ...], Dict[str, List[str]]] = {}
        for c in report["cases"]:
            if c["model"] == model:
                g = groups.setdefault(tuple(p for p in PRECISIONS if p in c["results"]), {"states": [], "data": []})
                for key, value in (("states", c["state"]), ("data", c["dataset"])):
                    if value not in g[key]:
                        g[key].append(value)
        parts.append(f"{model}: " + "; ".join(f"{', '.join(g['states'])} on {', '.join(g['data'])} "
                                               f"({', '.join(precs)})" for precs, g in groups.items()))
    return "; ".join(parts)


def header(report: dict) -> List[str]:
    runs = runs_of(report)
    shared = f"on {report['cpus']} CPUs shared with other jobs: wall times are noisy, counted costs are not"
    if len(runs) == 1:
        r = runs[0]
        return [f"{r['date']}, torch {r['torch']}, OMP_NUM_THREADS={r['omp_threads']}, {shared}; load average "
                f"{r['load_before']} before, {r.get('load_after')} after (1, 5, 15 min).", ""]
    several = len(machines(report)) > 1
    lines = [f"Measured in {len(runs)} runs (torch and threads per run below, {shared}" +
             ("; the ms column is the wall time on the machine of the case's run" if several else "") +
             "; load average before / after, 1, 5, 15 min):", ""]
    for r in runs:
        command = ("command not recorded" if r.get("argv") is None
                   else "`bench_xmax.py " + " ".join(r["argv"]) + "`")
        lines.append(f"* {r['date']}" + (f" on {r['machine']}" if several else "") +
                     f" (torch {r['torch']}, OMP_NUM_THREADS={r['omp_threads']}), "
                     f"{(r.get('seconds') or float('nan')) / 60:.0f} min, load {r['load_before']} / "
                     f"{r.get('load_after')}, {command}: {', '.join(r['cases']) or 'no case kept'}" +
                     (f" (superseded by a later run: {', '.join(r['superseded'])})" if r.get("superseded") else ""))
    return lines + [""]


def training_lines(report: dict) -> List[str]:
    trained = [c for c in report["cases"] if "training" in c]
    if not trained:
        return []
    lines = ["## How the cases trained here were trained", "",
             "`--train`: the model of `--init` (seed 0) trained by the benchmark's plain loop, on a fixed random "
             "subset of the training set; test error in eval mode on the whole test set. The other trained cases "
             "are ater-train checkpoints (`--runs`; their settings are not recorded in this file).", "",
             "| model | dataset | state | loop | epochs | training images | test error at init % | "
             "test error trained % | s / epoch | train xmax_grad_ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in trained:
        t = c["training"]
        per_epoch = sum(t["epoch_seconds"]) / len(t["epoch_seconds"])
        lines.append(f"| {c['model']} | {c['dataset']} | {c['state']} | {t['loop']} | {t['epochs']} | "
                     f"{t['train_images']} | {t['init_test_error']:.1f} | {t['test_error']:.1f} | "
                     f"{per_epoch:.0f} | {fmt(t['train_xmax_grad_ratio'])} |")
    return lines + [""]


SUMMARY_NAMES = ["random", "fd xi=0.0001", "fd xi=0.001", "fd xi=0.1", "fd xi=0.5", "central xi=0.1", "hvp",
                 "fd steps=2", "fd steps=4", "fd steps=8", "hvp steps=2", "hvp steps=4", "hvp steps=8"]


def summary(report: dict, precision: str) -> List[str]:
    lines = [f"## Summary: fraction of the reference reached ({precision})", "",
             "| model | dataset | state | clean | " + " | ".join(SUMMARY_NAMES) + " |",
             "|---|---|---|---|" + "---|" * len(SUMMARY_NAMES)]
    for case in report["cases"]:
        if precision not in case["results"]:
            continue
        rows = {r["name"]: r for r in case["results"][precision]["methods"]}
        cells = [fmt(rows[n]["fraction"]) if n in rows else "-" for n in ["clean"] + SUMMARY_NAMES]
        lines.append(f"| {case['model']} | {case['dataset']} | {case['state']} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(report: dict) -> str:
    lines = [f"# x_max study on {' and '.join(machines(report))}", ""] + header(report) + [
             "Each model in train mode (batch-statistics BatchNorm, as ATER sees it), a fixed subset of the test "
             "set, eps as trained (2.0). **fraction**: mean ||grad_x L|| at the point reached over the reference's "
             "(many-step projected ascent in the ball from several starts, per row the best of it and of every "
             "maximiser). **cos**: median per-sample cosine of the step to the exact one-step HVP direction. "
             "**fwd-eq**: counted multiply-adds over one forward's (a first-order pass is 2: forward and "
             "input-gradient backward). **ms**: wall time of one fp32 run. bf16 = the penalty's bf16 autocast: "
             "the maximisers' passes run in fp32 by design, only the evaluation of the norm is bf16. "
             "The rows of a batch-statistics BatchNorm model (the MLP, conv-large, ResNet-18) interact, so the "
             "reference assembled row by row is not a strict bound there: fractions above 1 come from that. "
             "conv-large runs with dropout active, as in training.", "",
             f"Cases: {coverage(report)}.", ""]
    lines += training_lines(report)
    lines += summary(report, "fp32")
    if any("fp64" in c["results"] for c in report["cases"]):
        lines += summary(report, "fp64")
    lines += ["Counted cost of each (forward-equivalents, fp32; the same for every state of a model):", "",
              "| model | " + " | ".join(SUMMARY_NAMES) + " | reference |", "|---|" + "---|" * (len(SUMMARY_NAMES) + 1)]
    seen = set()
    for case in report["cases"]:
        if case["model"] in seen:
            continue
        seen.add(case["model"])
        rows = {r["name"]: r for r in case["results"]["fp32"]["methods"]}
        lines.append(f"| {case['model']} | " + " | ".join(
            fmt(rows[n]["forward_equivalents"], 1) if n in rows else "-" for n in SUMMARY_NAMES + ["reference"]) + " |")
    lines.append("")
    for case in report["cases"]:
        res = case["results"]
        precs = [p for p in PRECISIONS if p in res]
        r32 = res["fp32"]
        lines += [f"## {case['model']} / {case['dataset']} / {case['state']}", "",
                  f"batch {r32['batch']}, eps {r32['eps']}, reference: {r32['reference_iters']} steps from "
                  f"{r32['reference_starts']} starts; reference mean norm (fp32) "
                  f"{next(r['grad_norm'] for r in r32['methods'] if r['name'] == 'reference'):.4g}", ""]
        if "training" in case:
            t = case["training"]
            lines += [f"Trained here: {t['method'].upper()}, {t['epochs']} epochs on {t['train_images']} training "
                      f"images; test error {t['init_test_error']:.1f} % at init, {t['test_error']:.1f} % trained.", ""]
        lines += ["| maximiser | " + " | ".join(f"fraction {p}" for p in precs) + " | cos fp32 | fwd-eq | ms |",
                  "|---|" + "---|" * len(precs) + "---|---|---|"]
        by_prec = {p: {r["name"]: r for r in res[p]["methods"]} for p in precs}
        for row in r32["methods"]:
            name = row["name"]
            fr = [fmt(by_prec[p][name]["fraction"], 3) if name in by_prec[p] else "-" for p in precs]
            lines.append(f"| {name} | " + " | ".join(fr) + f" | {fmt(row['cos_hvp'], 3)} | "
                         f"{fmt(row['forward_equivalents'], 1)} | {fmt(1000 * row['seconds'], 0)} |")
        if "fp64" in by_prec and "fd xi=1e-06" in by_prec["fp64"]:
            r = by_prec["fp64"]["fd xi=1e-06"]
            lines.append(f"| fd xi=1e-06 (fp64 only) | " + " | ".join(
                fmt(r["fraction"], 3) if p == "fp64" else "-" for p in precs) + f" | fp64 {fmt(r['cos_hvp'], 3)} | "
                f"{fmt(r['forward_equivalents'], 1)} | - |")
        lines.append("")
    return "\n".join(lines) + "\n"


def make_objective(method: str, model: nn.Module, args=None) -> Callable:
    """``(x, y) -> (loss, stats)`` of a training method: ERM, AT, ATER (the paper's
    one-step FD, default settings: eps = eps_adv = 2.0, lam 0.1) or ``ater-best``
    (ATER with ``args.best_direction`` / ``args.best_steps``)."""
    from ater_ext import objectives
    if method == "ater-best":
        return lambda x, y: objectives.ater_loss(model, x, y, direction=args.best_direction, steps=args.best_steps)
    return {"erm": lambda x, y: objectives.erm_loss(model, x, y),
            "at": lambda x, y: objectives.at_loss(model, x, y),
            "ater": lambda x, y: objectives.ater_loss(model, x, y)}[method]


def fit(model: nn.Module, data, objective: Callable, epochs: int, seed: int,
        train_images: Optional[int] = None) -> Tuple[List[float], List[float]]:
    """The plain training loop of this benchmark: Adam (lr 1e-3), batch 100 (an
    incomplete last batch is dropped), order drawn from a generator seeded with
    ``seed``; on the first ``train_images`` of a fixed random order of the
    training set (:func:`spread_subset`, seed 0: class-balanced in expectation)
    when given. Returns the wall seconds of each epoch and the ``xmax_grad_ratio``
    of every step that reports one."""
    x_train, y_train = data.x_train, data.y_train
    if train_images is not None:
        idx = spread_subset(len(x_train), train_images, seed=0)
        x_train, y_train = x_train[idx], y_train[idx]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    epoch_seconds, ratios = [], []
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order) - 99, 100):
            idx = order[i:i + 100]
            loss, stats = objective(x_train[idx], y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if "xmax_grad_ratio" in stats:
                ratios.append(float(stats["xmax_grad_ratio"]))
        epoch_seconds.append(time.perf_counter() - t0)
    return epoch_seconds, ratios


def test_error(model: nn.Module, data, chunk: int = 250) -> float:
    """Test error in % of ``model`` in eval mode on the whole test set (the mode is restored)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        wrong = sum(int((model(data.x_test[i:i + chunk]).argmax(1) != data.y_test[i:i + chunk]).sum())
                    for i in range(0, len(data.x_test), chunk))
    model.train(was_training)
    return 100.0 * wrong / len(data.x_test)


def train_one(method: str, seed: int, args) -> dict:
    """One training run of the comparison (see the module docstring)."""
    from ater_ext import energy_reg
    from ater_ext.robustness import attack_accuracy
    data = load_dataset("mnist-5k")
    torch.manual_seed(seed)
    model = build_model("mlp", data.input_shape, data.num_classes)
    epoch_seconds, ratios = fit(model, data, make_objective(method, model, args), args.epochs, seed)
    error = test_error(model, data)
    model.eval()
    sub = spread_subset(len(data.x_test), 500, seed=1)
    pgd = attack_accuracy(model, data.x_test[sub], data.y_test[sub], "pgd-l2", 2.0, steps=10)
    model.train()
    xs, ys = data.x_test[sub], data.y_test[sub]
    _, fd_stats = energy_reg(model, xs, ys, return_stats=True)
    return {"method": method, "seed": seed, "test_error": error, "pgd_l2_acc": pgd,
            "train_xmax_grad_ratio": sum(ratios) / len(ratios) if ratios else float("nan"),
            "final_fd_ratio": float(fd_stats["xmax_grad_ratio"]),
            "epoch_seconds": sum(epoch_seconds) / len(epoch_seconds),
            "cpu_load": [round(v, 2) for v in os.getloadavg()]}


def mean_std(values) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.2f} +- {std:.2f}"


def train_comparison(args, report: dict) -> Tuple[str, str]:
    methods = ["erm", "at", "ater", "ater-best"]
    runs = []
    for method in methods:
        for seed in range(args.seeds):
            runs.append(train_one(method, seed, args))
            tqdm.write(f"{method} seed {seed}: {runs[-1]}")
    report.update({"epochs": args.epochs, "seeds": args.seeds, "best": f"{args.best_direction} steps={args.best_steps}",
                   "runs": runs})
    lines = [f"# Does the maximiser matter for training? ({report['machine']})", "",
             f"{report['date']}, torch {report['torch']}, OMP_NUM_THREADS={report['omp_threads']}, load average "
             f"{report['load_before']} at the start on {report['cpus']} CPUs shared with other jobs (times per epoch "
             f"are noisy). Paper MLP on mnist-5k, {args.epochs} epochs, seeds 0..{args.seeds - 1}, one plain loop "
             f"(Adam 1e-3, batch 100); eps = eps_adv = 2.0, lam 0.1. ATER-best: x_max by "
             f"`direction={args.best_direction!r}, steps={args.best_steps}`. PGD: L2, eps 2.0, 10 steps, 500 test "
             "images. Ratios: mean ||grad_x L(x_max)|| / mean ||grad_x L(x)|| during training (the maximiser in "
             "use), and of the paper's one-step FD on the final model.", "",
             "| method | test error % | PGD-L2 acc % | train xmax_grad_ratio | final one-step FD ratio | s / epoch |",
             "|---|---|---|---|---|---|"]
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        cells = [mean_std([r[key] for r in rs]) for key in
                 ("test_error", "pgd_l2_acc", "train_xmax_grad_ratio", "final_fd_ratio", "epoch_seconds")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "xmax-train", "\n".join(lines) + "\n"


def write_results(json_path: str, report: dict) -> None:
    """The JSON and its markdown (same name, ``.md``), each written atomically."""
    write_json(json_path, report)
    write_text(json_path[:-len(".json")] + ".md", markdown(report))


def rewrite_markdown(json_path: str) -> str:
    """The markdown of a results file again (e.g. after a change of the tables), from its JSON."""
    with open(json_path) as f:
        report = json.load(f)
    md = json_path[:-len(".json")] + ".md"
    write_text(md, markdown(report))
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="*", default=[], help="ater-train output folders (best.pt)")
    p.add_argument("--init", nargs="*", default=[], metavar="MODEL:DATASET", help="initialised models")
    p.add_argument("--train", nargs="*", default=[], metavar="MODEL:DATASET:METHOD",
                   help="models trained here first (METHOD erm or ater; MODEL as --init, resnet18 included)")
    p.add_argument("--train-epochs", type=int, default=1, help="epochs of each --train model")
    p.add_argument("--train-subset", type=int, default=None,
                   help="training images of each --train model (a fixed random subset; default all)")
    p.add_argument("--train-dir", default=os.path.join(tempfile.gettempdir(), "bench_xmax_train"),
                   help="where the --train weights are kept and reused (not the repository)")
    p.add_argument("--results", default=None, metavar="JSON",
                   help="the results file to write (default --out/xmax-<this machine>.json)")
    p.add_argument("--merge", action="store_true",
                   help="add the cases to the results file already there (a case of the same model, dataset "
                        "and state is replaced) instead of starting a new one")
    p.add_argument("--merge-from", nargs="*", default=[], metavar="JSON",
                   help="run nothing: merge these results files' cases and runs into --results, as --merge would")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--big-batch", type=int, default=8, help="batch of conv-large and ResNet-18")
    p.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--steps", nargs="*", type=int, default=list(DEFAULT_STEPS))
    p.add_argument("--reference-iters", type=int, default=30)
    p.add_argument("--fp64-big", action="store_true", help="also fp64 for conv-large and ResNet-18 (slow on CPU)")
    p.add_argument("--quick", action="store_true", help="batch 16, 4 big, steps 2 4, 8 reference steps")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--markdown-from", default=None, metavar="JSON",
                   help="only rewrite the markdown of an earlier results file from its JSON")
    p.add_argument("--train-comparison", action="store_true", help="the training comparison instead of the study")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--best-direction", default="hvp", choices=["fd", "hvp"])
    p.add_argument("--best-steps", type=int, default=4)
    args = p.parse_args(argv)
    if args.markdown_from:
        print(rewrite_markdown(args.markdown_from))
        return 0
    if args.quick:
        args.batch, args.big_batch, args.steps, args.reference_iters = 16, 4, [2, 4], 8
    report = {"machine": machine_name(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "torch": torch.__version__, "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
              "cpus": os.cpu_count(), "load_before": [round(v, 2) for v in os.getloadavg()], "cases": []}
    start = time.perf_counter()
    name = machine_info("cpu" if not torch.cuda.is_available() else "cuda")[0]
    if args.train_comparison:
        stem, text = train_comparison(args, report)
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, f"{stem}-{name}.json"), report)
        write_text(os.path.join(args.out, f"{stem}-{name}.md"), text)
        print(os.path.join(args.out, f"{stem}-{name}.md"))
        return 0
    report["machine_slug"] = name
    json_path = args.results or os.path.join(args.out, f"xmax-{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    earlier = None
    if (args.merge or args.merge_from) and os.path.exists(json_path):
        with open(json_path) as f:
            earlier = json.load(f)
    if args.merge_from:
        for source in args.merge_from:
            with open(source) as f:
                earlier = merge_reports(earlier, json.load(f))
        write_results(json_path, earlier)
        print(json_path[:-len(".json")] + ".md")
        return 0
    run = {key: report[key] for key in ("machine", "date", "torch", "omp_threads", "cpus", "load_before")}
    run.update({"argv": list(sys.argv[1:] if argv is None else argv), "cases": []})
    report["runs"] = [run]
    for model_name, dataset, state, model, data, eps, training in tqdm(cases(args), desc="x_max study"):
        t0 = time.perf_counter()
        results = run_case(model, data, model_name, eps, args)
        case = {"model": model_name, "dataset": dataset, "state": state, "eps": eps,
                "seconds": time.perf_counter() - t0, "results": results}
        if training is not None:
            case["training"] = training
        report["cases"].append(case)
        run["cases"].append(case_label(case))
        # written after every case, so that an interrupted run keeps what it measured
        report["load_after"] = run["load_after"] = [round(v, 2) for v in os.getloadavg()]
        report["seconds"] = run["seconds"] = time.perf_counter() - start
        write_results(json_path, merge_reports(earlier, report))
        tqdm.write(f"{model_name} {dataset} {state}: {time.perf_counter() - t0:.0f} s")
    print(json_path[:-len(".json")] + ".md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
