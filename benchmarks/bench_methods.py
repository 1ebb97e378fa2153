"""Training-step cost of every method side by side (issue 14): ERM, one-step AT,
ATER, 10-step PGD-AT (Madry et al.), 10-step TRADES and FGSM with a random
start (Wong et al.), each as one full step (loss, backward into the parameters,
Adam step) through ``ater_ext.TrainStep``, on the paper's MNIST MLP at B = 256,
conv-large at B = 16 and a torchvision ResNet-18 at B = 32 (3x32x32 inputs).

    python benchmarks/bench_methods.py [--device cpu|cuda] [--rounds N] [--quick] [--out benchmarks/results]

* Correctness first: on each model (fp64, eval mode so that dropout draws no
  masks, a batch of 8), every baseline's loss and parameter gradients must equal
  its plain-PyTorch twin in ``ater_ext.reference``.
* Timing: medians of interleaved rounds (``bench_step.median_step_times``).
* Counted cost: the forward-equivalents of each method's matrix products
  (python_tests/test_baselines.py checks the formulas): ERM 3, AT 6, ATER 14,
  PGD-AT(k) 2k + 3, TRADES(k) 2k + 6, FGSM-RS 5, less the first layer's unused
  input gradient.
* Target (CPU): an ATER step <= 0.6x a 10-step PGD-AT step on the MLP and
  conv-large; the results file says by how much a miss misses.

Writes ``methods-<machine>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import copy
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import machine_info  # noqa: E402
from bench_step import git_commit, median_step_times  # noqa: E402

from ater_ext import TrainStep, objectives, reference  # noqa: E402
from ater_ext.atomic_io import write_json, write_text  # noqa: E402
from ater_ext.models import build_model  # noqa: E402

EPS, EPS_LINF, STEPS = 2.0, 0.1, 10
METHODS: Dict[str, Callable] = {
    "erm": lambda m, x, y: objectives.erm_loss(m, x, y),
    "at": lambda m, x, y: objectives.at_loss(m, x, y, eps_adv=EPS),
    "ater": lambda m, x, y: objectives.ater_loss(m, x, y, eps_adv=EPS, eps=EPS, lam=0.1),
    "pgd_at": lambda m, x, y: objectives.pgd_at_loss(m, x, y, eps=EPS, steps=STEPS),
    "trades": lambda m, x, y: objectives.trades_loss(m, x, y, eps=EPS, steps=STEPS),
    "fgsm_rs": lambda m, x, y: objectives.fgsm_rs_loss(m, x, y, eps=EPS_LINF),
}
LABELS = {"erm": "ERM", "at": "AT (1 step)", "ater": "ATER", "pgd_at": f"PGD-AT ({STEPS} steps)",
          "trades": f"TRADES ({STEPS} steps)", "fgsm_rs": "FGSM-RS"}
FORWARD_EQUIVALENTS = {"erm": 3, "at": 6, "ater": 14, "pgd_at": 2 * STEPS + 3, "trades": 2 * STEPS + 6,
                       "fgsm_rs": 5}
CASES = [("mlp", (1, 28, 28), 256), ("conv-large", (3, 32, 32), 16), ("resnet18", (3, 32, 32), 32)]
TARGET_MODELS = ("mlp", "conv-large")
TARGET = 0.6


def make_model(name: str, shape, classes: int = 10) -> torch.nn.Module:
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=classes)
    return build_model(name, shape, classes)


def setup(name: str, shape, batch: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = make_model(name, shape).to(device).train()
    x = torch.rand(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def _grads(loss, model) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def check_correctness(name: str, shape, device: str) -> Dict[str, float]:
    """Each baseline against its reference twin (fp64, eval mode, B = 8); the relative gradient gaps."""
    model, x, y = setup(name, shape, 8, device)
    model, x = model.double().eval(), x.double()
    gen = lambda: torch.Generator(device=device).manual_seed(3)  # noqa: E731
    noise = torch.randn(x.shape, dtype=x.dtype, device=device, generator=gen())
    cases = {
        "pgd_at": (lambda m: objectives.pgd_at_loss(m, x, y, eps=EPS, steps=3, generator=gen())[0],
                   lambda m: reference.ref_pgd_at_loss(m, x, y, eps=EPS, steps=3, start=reference.ref_uniform_start(
                       x, EPS, "l2", gen()))),
        "trades": (lambda m: objectives.trades_loss(m, x, y, eps=EPS, steps=3, generator=gen())[0],
                   lambda m: reference.ref_trades_loss(m, x, y, eps=EPS, steps=3, noise=noise)),
        "fgsm_rs": (lambda m: objectives.fgsm_rs_loss(m, x, y, eps=EPS_LINF, generator=gen())[0],
                    lambda m: reference.ref_fgsm_rs_loss(m, x, y, eps=EPS_LINF, start=reference.ref_uniform_start(
                        x, EPS_LINF, "linf", gen()))),
    }
    gaps = {}
    for method, (fast, ref) in cases.items():
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        la, lb = fast(a), ref(b)
        if abs(float(la) - float(lb)) > 1e-9 * abs(float(lb)):
            raise AssertionError(f"{name}: {method} loss {float(la)} != reference {float(lb)}")
        ga, gb = _grads(la, a), _grads(lb, b)
        gaps[method] = float((ga - gb).norm() / gb.norm())
        if gaps[method] > 1e-8:
            raise AssertionError(f"{name}: {method} gradients differ from the reference (relative {gaps[method]:.2e})")
    return gaps


def step_of(method: str, model: torch.nn.Module) -> TrainStep:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return TrainStep(model, optimizer, METHODS[method])


def render_markdown(report: dict) -> str:
    names = list(METHODS)
    lines = [f"# Training-step cost per method: {report['machine']}", "",
             f"device `{report['device']}`, torch {report['torch']}, {report['threads']} threads, {report['date']}, "
             f"commit {report['commit']}; median of {report['rounds']} interleaved rounds; one step = loss + backward "
             f"into the parameters + Adam step (`ater_ext.TrainStep`). L2 radius {EPS} (FGSM-RS: L-inf "
             f"{EPS_LINF}), {STEPS} attack steps. Each baseline's loss and gradients were checked against "
             f"`ater_ext.reference` (fp64) before timing.", "",
             "| model, B | " + " | ".join(f"{LABELS[n]} ms" for n in names) + " | ATER / PGD-AT |",
             "|---|" + "---|" * (len(names) + 1)]
    for r in report["rows"]:
        t = r["seconds"]
        lines.append(f"| {r['model']}, {r['batch']} | " + " | ".join(f"{t[n] * 1e3:.1f}" for n in names)
                     + f" | {t['ater'] / t['pgd_at']:.2f} |")
    lines += ["", "Counted cost (forward-equivalents of the matrix products, "
                  "python_tests/test_baselines.py): " + ", ".join(f"{LABELS[n]} {FORWARD_EQUIVALENTS[n]}"
                                                                  for n in names)
              + f"; ATER / PGD-AT = {FORWARD_EQUIVALENTS['ater'] / FORWARD_EQUIVALENTS['pgd_at']:.2f}.", "",
              f"## Target (CPU): ATER step <= {TARGET}x a {STEPS}-step PGD-AT step on the MLP and conv-large", ""]
    for t in report["targets"]:
        lines.append(f"- **{t['status']}** {t['text']}")
    floor = FORWARD_EQUIVALENTS["ater"] / FORWARD_EQUIVALENTS["pgd_at"]
    if any(t["status"] == "FAIL" for t in report["targets"]) and floor > TARGET:
        lines += ["", f"Why a miss: the target is below the counted floor. An ATER step does "
                      f"{FORWARD_EQUIVALENTS['ater']} forward-equivalents of matrix products (its extra "
                      f"input-gradient passes, then the training forwards and the backward through the "
                      f"penalty) against PGD-AT's {FORWARD_EQUIVALENTS['pgd_at']}, "
                      f"so where those products dominate the step (conv-large: convolutions) the ratio "
                      f"cannot fall below {floor:.2f} = {floor / TARGET - 1:.0%} over the target, whatever "
                      f"the kernels do; the fused ops already remove the elementwise work around them "
                      f"(the MLP, where that work is a larger share, meets the target)."]
    return "\n".join(lines) + "\n"


def targets(rows: List[dict]) -> List[dict]:
    out = []
    for r in rows:
        if r["model"] not in TARGET_MODELS:
            continue
        ratio = r["seconds"]["ater"] / r["seconds"]["pgd_at"]
        status = "PASS" if ratio <= TARGET else "FAIL"
        text = f"{r['model']} B = {r['batch']}: ATER / PGD-AT = {ratio:.2f} (target <= {TARGET}"
        text += ")" if ratio <= TARGET else f"; missed by {ratio / TARGET - 1:.0%})"
        out.append({"status": status, "value": ratio, "text": text})
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="the MLP at B = 64 only, 2 rounds (smoke test)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    cases = [("mlp", (1, 28, 28), 64)] if args.quick else CASES
    rounds = 2 if args.quick else args.rounds
    rows = []
    for name, shape, batch in tqdm(cases, desc="methods benchmark"):
        gaps = check_correctness(name, shape, args.device)
        base, x, y = setup(name, shape, batch, args.device)
        steps = {m: step_of(m, copy.deepcopy(base)) for m in METHODS}
        rows.append({"model": name, "shape": list(shape), "batch": batch, "grad_rel_gaps": gaps,
                     "seconds": median_step_times(steps, x, y, args.device, rounds)})
    slug, machine = machine_info(args.device)
    report = {"machine": machine, "device": args.device, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "rounds": rounds, "commit": git_commit(), "rows": rows, "forward_equivalents": FORWARD_EQUIVALENTS}
    report["targets"] = targets(rows) if args.device == "cpu" else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    write_json(str(out / f"methods-{slug}{suffix}.json"), report)
    write_text(str(out / f"methods-{slug}{suffix}.md"), render_markdown(report))
    print(render_markdown(report))


if __name__ == "__main__":
    main()
