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
grey images repeated to 3 channels. Writes ``xmax-<machine>.json`` and ``.md``
to ``--out`` (default ``benchmarks/results``), through ``ater_ext.atomic_io``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List, Tuple

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


def load_run(folder: str) -> Tuple[str, str, str, nn.Module, object, float]:
    from ater_ext.cli.targets import from_checkpoint
    target = from_checkpoint(os.path.join(folder, "best.pt"), None, torch.device("cpu"))
    info = target.info
    eps = float(info.get("train_eps") or 2.0)
    state = STATE_NAMES.get(info["method"], info["method"])
    return info["model"], info["dataset"], state, target.model, target.data, eps


def cases(args) -> List[Tuple[str, str, str, nn.Module, object, float]]:
    out = [load_run(folder) for folder in args.runs]
    for spec in args.init:
        model_name, _, dataset = spec.partition(":")
        data = load_dataset(dataset)
        out.append((model_name, dataset, "init", init_model(model_name, data), data, 2.0))
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


def markdown(report: dict) -> str:
    lines = [f"# x_max study on {report['machine']}", "",
             f"{report['date']}, torch {report['torch']}, OMP_NUM_THREADS={report['omp_threads']}; "
             f"load average {report['load_before']} before, {report['load_after']} after (1, 5, 15 min) on "
             f"{report['cpus']} CPUs shared with other jobs: wall times are noisy, counted costs are not.", "",
             "Each model in train mode (batch-statistics BatchNorm, as ATER sees it), a fixed subset of the test "
             "set, eps as trained (2.0). **fraction**: mean ||grad_x L|| at the point reached over the reference's "
             "(many-step projected ascent in the ball from several starts, per row the best of it and of every "
             "maximiser). **cos**: median per-sample cosine of the step to the exact one-step HVP direction. "
             "**fwd-eq**: counted multiply-adds over one forward's (a first-order pass is 2: forward and "
             "input-gradient backward). **ms**: wall time of one fp32 run. bf16 = the penalty's bf16 autocast: "
             "the maximisers' passes run in fp32 by design, only the evaluation of the norm is bf16. "
             "The rows of a batch-statistics BatchNorm model (the MLP, conv-large, ResNet-18) interact, so the "
             "reference assembled row by row is not a strict bound there: fractions above 1 (ResNet-18 at batch 8) "
             "come from that. conv-large (dropout active, as in training) and ResNet-18 are at initialisation "
             "only, fp32 and bf16 only (training them on this CPU did not fit the session).", ""]
    summary_names = ["random", "fd xi=0.0001", "fd xi=0.001", "fd xi=0.1", "fd xi=0.5", "central xi=0.1", "hvp",
                     "fd steps=2", "fd steps=4", "fd steps=8", "hvp steps=2", "hvp steps=4", "hvp steps=8"]
    lines += ["## Summary: fraction of the reference reached (fp32)", "",
              "| model | dataset | state | clean | " + " | ".join(summary_names) + " |",
              "|---|---|---|---|" + "---|" * len(summary_names)]
    for case in report["cases"]:
        rows = {r["name"]: r for r in case["results"]["fp32"]["methods"]}
        cells = [fmt(rows[n]["fraction"]) if n in rows else "-" for n in ["clean"] + summary_names]
        lines.append(f"| {case['model']} | {case['dataset']} | {case['state']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += ["Counted cost of each (forward-equivalents, fp32; the same for every state of a model):", "",
              "| model | " + " | ".join(summary_names) + " | reference |", "|---|" + "---|" * (len(summary_names) + 1)]
    seen = set()
    for case in report["cases"]:
        if case["model"] in seen:
            continue
        seen.add(case["model"])
        rows = {r["name"]: r for r in case["results"]["fp32"]["methods"]}
        lines.append(f"| {case['model']} | " + " | ".join(
            fmt(rows[n]["forward_equivalents"], 1) if n in rows else "-" for n in summary_names + ["reference"]) + " |")
    lines.append("")
    for case in report["cases"]:
        res = case["results"]
        precs = [p for p in PRECISIONS if p in res]
        r32 = res["fp32"]
        lines += [f"## {case['model']} / {case['dataset']} / {case['state']}", "",
                  f"batch {r32['batch']}, eps {r32['eps']}, reference: {r32['reference_iters']} steps from "
                  f"{r32['reference_starts']} starts; reference mean norm (fp32) "
                  f"{next(r['grad_norm'] for r in r32['methods'] if r['name'] == 'reference'):.4g}", "",
                  "| maximiser | " + " | ".join(f"fraction {p}" for p in precs) + " | cos fp32 | fwd-eq | ms |",
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


def train_one(method: str, seed: int, args) -> dict:
    """One training run of the comparison (see the module docstring)."""
    from ater_ext import energy_reg, objectives
    from ater_ext.robustness import attack_accuracy
    data = load_dataset("mnist-5k")
    torch.manual_seed(seed)
    model = build_model("mlp", data.input_shape, data.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    objective = {"erm": lambda x, y: objectives.erm_loss(model, x, y),
                 "at": lambda x, y: objectives.at_loss(model, x, y),
                 "ater": lambda x, y: objectives.ater_loss(model, x, y),
                 "ater-best": lambda x, y: objectives.ater_loss(model, x, y, direction=args.best_direction,
                                                                steps=args.best_steps)}[method]
    epoch_seconds, ratios = [], []
    for _ in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(data.x_train), generator=gen)
        for i in range(0, len(order) - 99, 100):
            idx = order[i:i + 100]
            loss, stats = objective(data.x_train[idx], data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if "xmax_grad_ratio" in stats:
                ratios.append(stats["xmax_grad_ratio"])
        epoch_seconds.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        error = 100.0 * float((model(data.x_test).argmax(1) != data.y_test).float().mean())
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


def rewrite_markdown(json_path: str) -> str:
    """The markdown of a results file again (e.g. after a change of the tables), from its JSON."""
    import json
    with open(json_path) as f:
        report = json.load(f)
    md = json_path[:-len(".json")] + ".md"
    write_text(md, markdown(report))
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="*", default=[], help="ater-train output folders (best.pt)")
    p.add_argument("--init", nargs="*", default=[], metavar="MODEL:DATASET", help="initialised models")
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
    os.makedirs(args.out, exist_ok=True)
    for model_name, dataset, state, model, data, eps in tqdm(cases(args), desc="x_max study"):
        t0 = time.perf_counter()
        results = run_case(model, data, model_name, eps, args)
        report["cases"].append({"model": model_name, "dataset": dataset, "state": state, "eps": eps,
                                "seconds": time.perf_counter() - t0, "results": results})
        # written after every case, so that an interrupted run keeps what it measured
        report["load_after"] = [round(v, 2) for v in os.getloadavg()]
        report["seconds"] = time.perf_counter() - start
        write_json(os.path.join(args.out, f"xmax-{name}.json"), report)
        write_text(os.path.join(args.out, f"xmax-{name}.md"), markdown(report))
        tqdm.write(f"{model_name} {dataset} {state}: {time.perf_counter() - t0:.0f} s")
    print(os.path.join(args.out, f"xmax-{name}.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
