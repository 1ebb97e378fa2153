"""Training-step benchmark: one full step (loss, backward, Adam step) of ERM, AT,
a naive ATER (Algorithm 1 written plainly in eager PyTorch) and ater_ext's
``ater_loss``, side by side in one process; also ``ater_loss`` with a plain
``loss.backward()`` instead of TrainStep's backward into the parameters, ``compile=True``, the bf16
autocast path (ERM and ATER), and on CUDA ``compile="reduce-overhead"`` and the
whole step captured in a CUDA graph (``TrainStep(cuda_graph=True)``). Cases:
the MNIST MLP at B = 64, 256, 1024, the same MLP on 3x32x32 inputs (D grows
from 784 to 3072) and conv-large at B = 16.

    python benchmarks/bench_step.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

* Correctness first: the naive and the ater_ext ATER losses and parameter
  gradients must agree (BatchNorm in train mode uses batch statistics in every
  pass, so the values are the same; only the naive step also rewrites the
  running statistics), and on CUDA the captured step must train like the eager one.
* Timing: each variant has its own copy of the model and optimiser; rounds
  interleave the variants (one step each per round) and the medians are
  reported, so drifting machine load hits all of them alike.
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` growth over one
  step; on CPU (no allocator statistics) the peak of the torch.profiler memory
  timeline (``export_memory_timeline``) over one step after a warm-up step:
  the bytes of tensors the step allocates and holds at its peak.

Writes ``step-<machine>.json`` and ``step-<machine>.md`` beside the kernel results.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import machine_info  # noqa: E402

from ater_ext import TrainStep, objectives  # noqa: E402
from ater_ext.atomic_io import write_json, write_text  # noqa: E402
from ater_ext.passes import has_active_dropout  # noqa: E402
from ater_ext.models import build_model  # noqa: E402

WHY = """\
The step is mostly matrix products (table above). For the MLP's 5 linear layers an ERM step does 14:
5 forward, 5 weight-gradient and 4 input-gradient products. ater_ext's ATER step does 68: the clean
forward and one backward giving both pass 1's input gradient and the clean weight gradients (15),
the adversarial forward and its backward (14), pass 2's forward and input-gradient backward (10), the
penalty's forward and create_graph backward (10), and the double backward through them (19; a plain
`loss.backward()` adds a 20th, the input gradient at x_max, which `TrainStep`'s backward into the
parameters skips, for every variant). The count ratio is about 4.9x ERM; the time ratio differs
from it because the products differ in size (the table's matmul time column), and BatchNorm's
double backward, the elementwise work and the fixed per-step costs (the optimiser step) come on
top. The naive step does about 18 forward-pass units to ater_ext's 14 (a separate AT gradient pass and pass
1, and a clean graph traversed twice). Memory: ater_ext computes the first-order terms' weight
gradients (clean and adversarial losses) as soon as each term exists and hands them over in the
caller's backward, so their graphs are freed before the penalty's double backward is built, and
train-mode BatchNorm passes keep no copies of the running statistics; the naive step holds the
clean and adversarial graphs until its backward."""
EPS_ADV, EPS, XI, LAM = 2.0, 2.0, 1e-3, 0.1


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def naive_ater_loss(model, x, y):
    """Algorithm 1 as one would write it in eager PyTorch: an AT pass, then a
    separate energy regulariser with its own passes and unfused normalisations."""
    x_ = x.detach().requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(model(x_), y), x_)[0]
    x_adv = (x + EPS_ADV * _unit(g)).detach()
    x1 = x.detach().requires_grad_(True)
    g1 = torch.autograd.grad(F.cross_entropy(model(x1), y, reduction="sum"), x1)[0]
    probe = (x + XI * _unit(g1)).detach().requires_grad_(True)
    g2 = torch.autograd.grad(F.cross_entropy(model(probe), y, reduction="sum"), probe)[0]
    x_max = (x + EPS * _unit(g2 - g1)).detach().requires_grad_(True)
    gx = torch.autograd.grad(F.cross_entropy(model(x_max), y, reduction="sum"), x_max, create_graph=True)[0]
    energy = gx.flatten(1).norm(dim=1).mean()
    return F.cross_entropy(model(x), y) + F.cross_entropy(model(x_adv), y) + LAM * energy


def _ater(m, x, y, **kw):
    return objectives.ater_loss(m, x, y, eps_adv=EPS_ADV, eps=EPS, lam=LAM, xi=XI, **kw)[0]


def _bf16(loss_fn: Callable) -> Callable:
    """``loss_fn`` under bf16 autocast (the probe passes stay fp32, SPEC)."""
    def run(m, x, y):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return loss_fn(m, x, y)
    return run


LOSSES: Dict[str, Callable] = {
    "erm": lambda m, x, y: objectives.erm_loss(m, x, y)[0],
    "at": lambda m, x, y: objectives.at_loss(m, x, y, eps_adv=EPS_ADV)[0],
    "naive_ater": naive_ater_loss,
    "ater": _ater,
    # the same step with a plain loss.backward() (PlainBackwardStep), which also fills x_max's .grad
    "ater_plain_backward": _ater,
    # pass 2 through torch.compile (models with dropout stay eager)
    "ater_compile": lambda m, x, y: _ater(m, x, y, compile=True),
    "erm_bf16": _bf16(lambda m, x, y: objectives.erm_loss(m, x, y)[0]),
    "ater_bf16": _bf16(_ater),
    # CUDA only: pass 2 compiled into CUDA graphs, and the whole step replayed from one
    "ater_reduce_overhead": lambda m, x, y: _ater(m, x, y, compile="reduce-overhead"),
    "ater_graph": _ater,
}
CUDA_ONLY = ("ater_reduce_overhead", "ater_graph")
LABELS = {"erm": "ERM", "at": "AT", "naive_ater": "naive ATER", "ater": "ater_ext ATER",
          "ater_plain_backward": "ATER, plain backward()",
          "ater_compile": "compile=True", "erm_bf16": "ERM bf16", "ater_bf16": "ATER bf16",
          "ater_reduce_overhead": 'compile="reduce-overhead"', "ater_graph": "TrainStep(cuda_graph=True)"}


def variants(device: str) -> List[str]:
    return [v for v in LOSSES if device == "cuda" or v not in CUDA_ONLY]


class PlainBackwardStep(TrainStep):
    """TrainStep with the hand-written loop's plain ``loss.backward()``, which also
    fills x_max's ``.grad``: against TrainStep it shows what skipping that saves."""

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def make_step(name: str, model: torch.nn.Module, sgd: bool = False) -> Callable:
    """One variant's training step (loss + backward + Adam step, or SGD) on its own model and optimiser."""
    graph = name == "ater_graph"
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if sgd else
           torch.optim.Adam(model.parameters(), lr=1e-4, capturable=graph))
    if name == "ater_plain_backward":
        return PlainBackwardStep(model, opt, LOSSES[name])
    return TrainStep(model, opt, LOSSES[name], cuda_graph=graph)


def variants_for(model: torch.nn.Module, device: str) -> List[str]:
    """The variants a model can run: a captured step cannot reuse dropout masks (TrainStep refuses)."""
    return [v for v in variants(device) if not (v == "ater_graph" and has_active_dropout(model))]


CASES = [  # (model, input shape, batch sizes): the MNIST MLP, the same MLP on D = 3072 inputs, conv-large
    ("mlp", (1, 28, 28), (64, 256, 1024)),
    ("mlp", (3, 32, 32), (64, 256, 1024)),
    ("conv-large", (3, 32, 32), (16,)),
]


def setup(model_name: str, shape, batch: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(model_name, shape, 10).to(device).train()
    x = torch.rand(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def check_correctness(model_name: str, shape, device: str) -> float:
    """Naive and ater_ext ATER agree in value and parameter gradients (in fp64: in fp32 the finite
    difference amplifies rounding differences by 1/xi); returns the relative gradient gap."""
    model, x, y = setup(model_name, shape, 32, device)
    model, x = model.double(), x.double()
    if model_name == "conv-large":
        model.eval()  # dropout would draw different masks in the naive code's extra passes
    grads = {}
    for name in ("naive_ater", "ater"):
        m = copy.deepcopy(model)
        loss = LOSSES[name](m, x, y)
        loss.backward()
        grads[name] = (float(loss.detach()), torch.cat([p.grad.flatten() for p in m.parameters()]))
    (l0, g0), (l1, g1) = grads["naive_ater"], grads["ater"]
    if abs(l0 - l1) > 1e-9 * abs(l0):
        raise AssertionError(f"{model_name}: naive ATER loss {l0} != ater_ext {l1}")
    gap = float((g0 - g1).norm() / g1.norm())
    if gap > 1e-6:
        raise AssertionError(f"{model_name}: naive and ater_ext ATER gradients differ (relative {gap:.2e})")
    return gap


def check_graph_replay(device: str, steps: int = 4) -> float:
    """On CUDA: the captured step trains like the eager one (fp32, a few SGD steps:
    Adam would amplify the rounding noise in the gradients of biases that feed a
    BatchNorm); returns the relative parameter gap."""
    models = {}
    for name in ("ater", "ater_graph"):
        model, _, _ = setup("mlp", (1, 28, 28), 64, device)
        step = make_step(name, model, sgd=True)
        for i in range(steps):
            _, x, y = setup("mlp", (1, 28, 28), 64, device, seed=1 + i)
            step(x, y)
        models[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    gap = float((models["ater"] - models["ater_graph"]).norm() / models["ater"].norm())
    if gap > 1e-4:
        raise AssertionError(f"TrainStep(cuda_graph=True) drifted from the eager step (relative {gap:.2e})")
    return gap


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_step_times(steps: Dict[str, Callable], x, y, device: str, rounds: int) -> Dict[str, float]:
    """Median seconds of one call per step function, after two warm-up calls each (for a
    captured step, the capture); rounds interleave the steps so drifting load hits all alike."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for step in steps.values():
        step(x, y)
        step(x, y)
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step(x, y)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def time_steps(model_name: str, shape, batch: int, device: str, rounds: int) -> Dict[str, float]:
    """Median seconds of one full training step per variant, interleaved."""
    base, x, y = setup(model_name, shape, batch, device)
    steps = {name: make_step(name, copy.deepcopy(base)) for name in variants_for(base, device)}
    return median_step_times(steps, x, y, device, rounds)


def peak_memory(model_name: str, shape, batch: int, device: str, variant: str) -> float:
    """Peak bytes one training step of ``variant`` allocates (see module docstring)."""
    model, x, y = setup(model_name, shape, batch, device)
    step = make_step(variant, model)
    step(x, y)  # warm-up: Adam's state exists before the measured step
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(x, y)
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        with warnings.catch_warnings():  # deprecated in favour of CUDA-only snapshots: no CPU replacement
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.loads(Path(path).read_text())
    return float(max(sum(per_category) for per_category in sizes))


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_profile(model_name: str, shape, batch: int, device: str, variant: str, steps: int = 3) -> dict:
    """Matrix products per step of ``variant`` (torch.profiler over ``steps`` steps,
    after a warm-up step): how many, their time and their share of the step's op time."""
    from torch.profiler import ProfilerActivity, profile

    model, x, y = setup(model_name, shape, batch, device)
    step = make_step(variant, model)
    step(x, y)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(x, y)
        sync(device)
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    matmuls = [e for e in events if e.key in MATMUL_OPS]
    total = sum(getattr(e, attr) for e in events)
    mm_us = sum(getattr(e, attr) for e in matmuls)
    return {"count": sum(e.count for e in matmuls) // steps, "seconds": mm_us * 1e-6 / steps,
            "share": mm_us / total if total else 0.0}


def git_commit() -> str:
    """The measured code's commit (with "+changes" when the tree differs from it)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def _case(r: dict) -> str:
    return f"{r['model']} {'x'.join(map(str, r['shape']))}"


def render_markdown(report: dict) -> str:
    names = [v for v in LOSSES if any(v in r["seconds"] for r in report["rows"])]
    lines = [f"# ater_ext training-step benchmark: {report['machine']}", "",
             f"device `{report['device']}`, torch {report['torch']}, {report['threads']} threads, {report['date']}, "
             f"commit {report['commit']}; "
             f"median of {report['rounds']} interleaved rounds; one step = loss + backward + Adam step "
             f"(`ater_ext.TrainStep`: the backward goes into the parameters only; \"plain backward()\" is the "
             f"hand-written loop's `loss.backward()`). Peak memory: {report['memory_method']}. bf16 = the step under "
             f"`torch.autocast(dtype=torch.bfloat16)`.", "",
             "| model, input | B | " + " | ".join(f"{LABELS[n]} ms" for n in names)
             + " | ATER / naive | ATER / ERM | ATER bf16 / ERM bf16 | naive peak MB | ater_ext peak MB |",
             "|---|---|" + "---|" * (len(names) + 5)]
    for r in report["rows"]:
        t, mem = r["seconds"], r["peak_bytes"]
        lines.append(f"| {_case(r)} | {r['batch']} | "
                     + " | ".join(f"{t[n] * 1e3:.1f}" if n in t else "—" for n in names)
                     + f" | {r['ater_over_naive']:.2f} | {r['ater_over_erm']:.2f} | "
                     f"{t['ater_bf16'] / t['erm_bf16']:.2f} | "
                     f"{mem['naive_ater'] / 2**20:.1f} | {mem['ater'] / 2**20:.1f} |")
    if any(n not in r["seconds"] for r in report["rows"] for n in names):
        lines += ["", "—: not run; TrainStep(cuda_graph=True) refuses models with active dropout (conv-large), "
                      "whose masks the extra passes reuse by restoring the RNG state, impossible during capture."]
    mlp = [r for r in report["rows"] if r["model"] == "mlp"]
    lines += ["", "## Matrix products per step (torch.profiler over 3 steps, MLP)", "",
              "| input, B | ERM count | ATER count | count ATER / ERM | matmul time ATER / ERM | "
              "matmul share of the ATER step |", "|---|---|---|---|---|---|"]
    for r in mlp:
        mm = r["matmuls"]
        lines.append(f"| {'x'.join(map(str, r['shape']))}, {r['batch']} | {mm['erm']['count']} | "
                     f"{mm['ater']['count']} | {mm['ater']['count'] / mm['erm']['count']:.2f} | "
                     f"{mm['ater']['seconds'] / mm['erm']['seconds']:.2f} | {mm['ater']['share']:.0%} |")
    dims = sorted({r["in_features"] for r in mlp})
    lines += ["", "## ATER step time as B and D grow (MLP; D = input features)", "",
              "ater_ext ATER ms (× naive eager, × ERM)", "",
              "| B \\ D | " + " | ".join(map(str, dims)) + " |", "|---|" + "---|" * len(dims)]
    for batch in sorted({r["batch"] for r in mlp}):
        cells = []
        for d in dims:
            r = next((r for r in mlp if r["batch"] == batch and r["in_features"] == d), None)
            cells.append("—" if r is None else f"{r['seconds']['ater'] * 1e3:.1f} "
                         f"(×{r['ater_over_naive']:.2f}, ×{r['ater_over_erm']:.2f})")
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    lines += ["", f"## Targets ({TARGET_TEXT[report['device']]})", ""]
    lines += [f"- **{t['status']}** {t['text']}" for t in report["targets"]] or ["- not evaluated: this run has no MNIST MLP row at B = 256"]
    lines += ["", "## Why the step costs what it costs", "", WHY]
    return "\n".join(lines) + "\n"


TARGET_TEXT = {"cpu": "CPU: MNIST MLP, B = 256", "cuda": "GPU: MNIST MLP, B = 256"}


def targets(rows: List[dict], device: str) -> List[dict]:
    """The issue's targets, on the MNIST MLP (784 inputs) at B = 256."""
    row = next((r for r in rows if r["model"] == "mlp" and r["in_features"] == 784 and r["batch"] == 256), None)
    if row is None:
        return []
    t, mem = row["seconds"], row["peak_bytes"]
    if device == "cpu":
        checks = [("ater_ext ATER step / naive eager step", t["ater"] / t["naive_ater"], 0.85),
                  ("ater_ext ATER step / ERM step", t["ater"] / t["erm"], 5.0),
                  ("ater_ext ATER peak memory / naive", mem["ater"] / max(mem["naive_ater"], 1), 1.0)]
    else:
        checks = [("TrainStep(cuda_graph=True) ATER step / naive eager step", t["ater_graph"] / t["naive_ater"], 0.5),
                  ('compile="reduce-overhead" ATER step / naive eager step',
                   t["ater_reduce_overhead"] / t["naive_ater"], 0.5),
                  ("ater_ext ATER peak memory / naive", mem["ater"] / max(mem["naive_ater"], 1), 1.0)]
    return [{"status": "PASS" if value <= limit else "FAIL", "value": value,
             "text": f"{text} = {value:.2f} (target <= {limit:g}"
                     + ("" if value <= limit else f"; missed by {value / limit - 1:.0%}") + ")"}
            for text, value, limit in checks]


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="B=64 MLP only, 3 rounds (smoke test)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    cases = [("mlp", (1, 28, 28), (64,))] if args.quick else CASES
    rounds = 3 if args.quick else args.rounds
    rows = []
    jobs = [(m, s, b) for m, s, bs in cases for b in bs]
    graph_gap = check_graph_replay(args.device) if args.device == "cuda" else None
    for model_name, shape, batch in tqdm(jobs, desc="step benchmark"):
        gap = check_correctness(model_name, shape, args.device)
        seconds = time_steps(model_name, shape, batch, args.device, rounds)
        memory = {v: peak_memory(model_name, shape, batch, args.device, v) for v in ("naive_ater", "ater")}
        matmuls = ({v: matmul_profile(model_name, shape, batch, args.device, v) for v in ("erm", "ater")}
                   if model_name == "mlp" else None)
        rows.append({"matmuls": matmuls, "model": model_name, "shape": list(shape), "in_features": math.prod(shape), "batch": batch,
                     "seconds": seconds, "peak_bytes": memory,
                     "ater_over_naive": seconds["ater"] / seconds["naive_ater"],
                     "ater_over_erm": seconds["ater"] / seconds["erm"], "grad_rel_gap": gap})
    slug, name = machine_info(args.device)
    report = {"machine": name, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rounds": rounds,
              "memory_method": ("torch.cuda.max_memory_allocated growth" if args.device == "cuda" else
                                "peak of the torch.profiler memory timeline over one step (after a warm-up step)"),
              "commit": git_commit(), "graph_replay_rel_gap": graph_gap, "rows": rows}
    report["targets"] = targets(rows, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    write_json(str(out / f"step-{slug}{suffix}.json"), report)
    write_text(str(out / f"step-{slug}{suffix}.md"), render_markdown(report))
    print(render_markdown(report))


if __name__ == "__main__":
    main()
