"""Training-step benchmark: one full step (loss, backward, Adam step) of ERM, AT,
a naive ATER (Algorithm 1 written plainly in eager PyTorch) and ater_ext's
``ater_loss``, side by side in one process.

    python benchmarks/bench_step.py [--device cpu|cuda] [--quick] [--out benchmarks/results]

* Correctness first: the naive and the ater_ext ATER losses and parameter
  gradients must agree (BatchNorm in train mode uses batch statistics in every
  pass, so the values are the same; only the naive step also rewrites the
  running statistics).
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
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import machine_info  # noqa: E402

from ater_ext import objectives  # noqa: E402
from ater_ext.models import build_model  # noqa: E402

VARIANTS = ("erm", "at", "naive_ater", "ater", "ater_compile")

WHY = """\
Counting matrix products in units of one forward pass: an ERM step is 3 (forward, input- and
weight-gradient backward). ater_ext's ATER step is about 14: the clean forward and one backward that
gives both pass 1's input gradient and the clean loss's weight gradients (3), the adversarial
forward and its weight-gradient backward (3), pass 2 (forward + input-gradient backward, 2), the penalty's forward
and create_graph backward (2) and the double backward through them (about 4). So about 4.7x ERM is
the floor of the algorithm before elementwise and BatchNorm double-backward overheads; the naive
step is about 18 units (a separate AT gradient pass and pass 1, and a clean graph traversed twice).
Memory: ater_ext computes the first-order terms' weight gradients (clean and adversarial losses) as
soon as each term exists and hands them over in the caller's backward, so their graphs are freed
before the penalty's double backward is built, and train-mode BatchNorm passes keep no copies of the
running statistics; the naive step holds the clean and adversarial graphs until its backward."""
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


LOSSES: Dict[str, Callable] = {
    "erm": lambda m, x, y: objectives.erm_loss(m, x, y)[0],
    "at": lambda m, x, y: objectives.at_loss(m, x, y, eps_adv=EPS_ADV)[0],
    "naive_ater": naive_ater_loss,
    "ater": lambda m, x, y: objectives.ater_loss(m, x, y, eps_adv=EPS_ADV, eps=EPS, lam=LAM, xi=XI)[0],
    # pass 2 through torch.compile (the GPU option's CPU fallback; models with dropout stay eager)
    "ater_compile": lambda m, x, y: objectives.ater_loss(m, x, y, eps_adv=EPS_ADV, eps=EPS, lam=LAM, xi=XI,
                                                         compile=True)[0],
}

CASES = [  # (model, input shape, batch sizes)
    ("mlp", (1, 28, 28), (64, 256, 1024)),
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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(model_name: str, shape, batch: int, device: str, rounds: int) -> Dict[str, float]:
    """Median seconds of one full training step per variant, interleaved."""
    base, x, y = setup(model_name, shape, batch, device)
    states = {}
    for name in VARIANTS:
        m = copy.deepcopy(base)
        states[name] = (m, torch.optim.Adam(m.parameters(), lr=1e-4))
    times: Dict[str, List[float]] = {name: [] for name in VARIANTS}

    def step(name):
        m, opt = states[name]
        opt.zero_grad(set_to_none=True)
        LOSSES[name](m, x, y).backward()
        opt.step()

    for name in VARIANTS:  # warm-up
        step(name)
    for _ in range(rounds):
        for name in VARIANTS:
            sync(device)
            start = time.perf_counter()
            step(name)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_memory(model_name: str, shape, batch: int, device: str, variant: str) -> float:
    """Peak bytes one training step of ``variant`` allocates (see module docstring)."""
    model, x, y = setup(model_name, shape, batch, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        LOSSES[variant](model, x, y).backward()
        opt.step()

    step()  # warm-up: Adam's state exists before the measured step
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.loads(Path(path).read_text())
    return float(max(sum(per_category) for per_category in sizes))


def render_markdown(report: dict) -> str:
    lines = [f"# ater_ext training-step benchmark: {report['machine']}", "",
             f"device `{report['device']}`, torch {report['torch']}, {report['threads']} threads, {report['date']}; "
             f"median of {report['rounds']} interleaved rounds; one step = loss + backward + Adam step. "
             f"Peak memory: {report['memory_method']}.", "",
             "| model | B | ERM ms | AT ms | naive ATER ms | ater_ext ATER ms | compile=True ms | ATER / naive | "
             "ATER / ERM | naive peak MB | ater_ext peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        t, mem = r["seconds"], r["peak_bytes"]
        lines.append(f"| {r['model']} | {r['batch']} | {t['erm'] * 1e3:.1f} | {t['at'] * 1e3:.1f} | "
                     f"{t['naive_ater'] * 1e3:.1f} | {t['ater'] * 1e3:.1f} | {t['ater_compile'] * 1e3:.1f} | "
                     f"{r['ater_over_naive']:.2f} | "
                     f"{r['ater_over_erm']:.2f} | {mem['naive_ater'] / 2**20:.1f} | {mem['ater'] / 2**20:.1f} |")
    lines += ["", "## Targets (CPU: MNIST MLP, B = 256)", ""]
    lines += [f"- **{t['status']}** {t['text']}" for t in report["targets"]]
    lines += ["", "## Why the step costs what it costs", "", WHY]
    return "\n".join(lines) + "\n"


def targets(rows: List[dict], device: str) -> List[dict]:
    out = []
    for r in rows:
        if r["model"] != "mlp" or r["batch"] != 256 or device != "cpu":
            continue
        for text, value, ok in (
            ("ater_ext ATER step / naive eager step", r["ater_over_naive"], r["ater_over_naive"] <= 0.85),
            ("ater_ext ATER step / ERM step", r["ater_over_erm"], r["ater_over_erm"] <= 5.0),
            ("ater_ext ATER peak memory / naive", r["peak_bytes"]["ater"] / max(r["peak_bytes"]["naive_ater"], 1),
             r["peak_bytes"]["ater"] <= r["peak_bytes"]["naive_ater"]),
        ):
            limit = {"ater_ext ATER step / naive eager step": "<= 0.85", "ater_ext ATER step / ERM step": "<= 5",
                     "ater_ext ATER peak memory / naive": "<= 1"}[text]
            out.append({"status": "PASS" if ok else "FAIL", "value": value,
                        "text": f"{text} = {value:.2f} (target {limit})"})
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="B=64 MLP only, 3 rounds (smoke test)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    cases = [("mlp", (1, 28, 28), (64,))] if args.quick else CASES
    rounds = 3 if args.quick else args.rounds
    rows = []
    jobs = [(m, s, b) for m, s, bs in cases for b in bs]
    for model_name, shape, batch in tqdm(jobs, desc="step benchmark"):
        gap = check_correctness(model_name, shape, args.device)
        seconds = time_steps(model_name, shape, batch, args.device, rounds)
        memory = {v: peak_memory(model_name, shape, batch, args.device, v) for v in ("naive_ater", "ater")}
        rows.append({"model": model_name, "batch": batch, "seconds": seconds, "peak_bytes": memory,
                     "ater_over_naive": seconds["ater"] / seconds["naive_ater"],
                     "ater_over_erm": seconds["ater"] / seconds["erm"], "grad_rel_gap": gap})
    slug, name = machine_info(args.device)
    report = {"machine": name, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rounds": rounds,
              "memory_method": ("torch.cuda.max_memory_allocated growth" if args.device == "cuda" else
                                "peak of the torch.profiler memory timeline over one step (after a warm-up step)"),
              "rows": rows}
    report["targets"] = targets(rows, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (out / f"step-{slug}{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"step-{slug}{suffix}.md").write_text(render_markdown(report))
    print(render_markdown(report))


if __name__ == "__main__":
    main()
