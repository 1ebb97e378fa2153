"""A gradient-masking report: the sanity checks that tell real robustness from
robustness that only a weak, gradient-based attack sees (Athalye et al. 2018;
Carlini et al. 2019, "On Evaluating Adversarial Robustness"; SPEC section 5).

Each check has its numbers and a verdict; tolerances are absolute percentage
points of accuracy on the same points, so sampling noise does not enter.

``large_radius``
    PGD accuracy over growing radii up to the radius that lets the attack reach
    any input in the data range (L-inf 1, L2 ``sqrt(D)``): it must fall to
    about zero (at most ``zero_tolerance``). A masked gradient leaves it high.
``more_steps``
    PGD with 10, 20, 50 and 100 steps, then 100 steps from ``restarts`` random
    starts: the last two efforts must agree within ``tolerance`` (the attack has
    converged); the 10-step figure's excess is reported.
``single_step``
    A single-step attack (FGSM for L-inf, one normalised-gradient step for L2)
    must not beat 100-step PGD by more than ``tolerance``.
``black_box``
    Square (gradient-free; from pyautoattack) run on the points that survive the
    white-box attacks must break at most ``tolerance`` % of all points. With an
    AutoAttack result, its own Square stage is used (it already runs last, on
    the points the white-box attacks left).
``transfer``
    PGD examples made on a surrogate model (e.g. the ERM checkpoint) must not
    beat white-box PGD on the model by more than ``tolerance``.
``autoattack_warnings``
    AutoAttack's own warnings (zero gradients, randomised or dynamic defence,
    Square beating the white-box attacks) must be absent.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from . import attacks, robustness
from .robustness import AutoAttackResult, percent

__all__ = ["Check", "MaskingReport", "masking_report", "render_markdown"]

PGD_STEPS = (10, 20, 50, 100)


@dataclass
class Check:
    name: str
    passed: bool
    summary: str
    numbers: Dict[str, object] = field(default_factory=dict)


@dataclass
class MaskingReport:
    norm: str
    eps: float
    n: int
    clean_accuracy: float
    checks: List[Check]
    seconds: float
    settings: Dict[str, object]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def verdict(self) -> str:
        failed = [c.name for c in self.checks if not c.passed]
        return "no sign of gradient masking" if not failed else f"gradient masking suspected ({', '.join(failed)})"

    def to_dict(self) -> Dict[str, object]:
        return {"norm": self.norm, "eps": self.eps, "n": self.n, "clean_accuracy": self.clean_accuracy,
                "passed": self.passed, "verdict": self.verdict, "seconds": self.seconds, "settings": self.settings,
                "checks": [{"name": c.name, "passed": c.passed, "summary": c.summary, "numbers": c.numbers}
                           for c in self.checks]}


def _pgd_name(norm: str) -> str:
    return "pgd-l2" if norm == "l2" else "pgd-linf"


def _radii(eps: float, norm: str, dim: int) -> List[float]:
    """eps, 2 eps, 4 eps, ... up to the radius that reaches any point of [0, 1]^D."""
    top = math.sqrt(dim) if norm == "l2" else 1.0
    radii = []
    r = eps
    while r < top:
        radii.append(r)
        r *= 2
    return radii + [top]


def _square_breaks(model: nn.Module, x: Tensor, y: Tensor, candidates: Tensor, *, norm: str, eps: float,
                   queries: int, seed: int, device) -> Tensor:
    """``[N]`` bool: points among ``candidates`` that Square (gradient-free) breaks, each break verified."""
    from pyautoattack.square import SquareAttack

    broken = torch.zeros(len(x), dtype=torch.bool)
    idx = candidates.nonzero().flatten()
    if len(idx) == 0:
        return broken
    with attacks.model_mode(model, True), torch.random.fork_rng(
            devices=[device.index or 0] if device.type == "cuda" else []):
        square = SquareAttack(model, norm=robustness.AUTOATTACK_NORMS[norm], n_queries=queries, eps=eps, p_init=0.8,
                              n_restarts=1, seed=seed, verbose=False, device=device, resc_schedule=False)
        x_adv = square.perturb(x[idx].to(device), y[idx].to(device)).cpu()
    broken[idx] = robustness.verified_breaks(model, x_adv, x[idx], y[idx], norm=norm, eps=eps, device=device)
    return broken


def masking_report(model: nn.Module, x: Tensor, y: Tensor, *, norm: str, eps: float,
                   surrogate: Optional[nn.Module] = None, autoattack: Optional[AutoAttackResult] = None,
                   restarts: int = 5, square_queries: int = 5000, tolerance: Optional[float] = None,
                   zero_tolerance: Optional[float] = None, batch_size: int = 500, seed: int = 0, device=None,
                   progress: bool = True, output: robustness.OutputSpec = None) -> MaskingReport:
    """The checks of the module docstring for ``model`` on ``(x, y)`` at ``eps``.

    ``surrogate``: a model whose PGD examples are transferred (no transfer check
    without one); ``autoattack``: an AutoAttack result on the same points, norm
    and radius (its Square stage and warnings are used). Inputs in ``[0, 1]``.
    ``tolerance`` / ``zero_tolerance``: percentage points; by default 2, or
    three points' worth (``300 / N``) when that is more, since one point of
    ``N`` moves an accuracy by ``100 / N``. ``output``: where the logits are in
    the model's output (a surrogate must return logits: wrap it with
    :func:`ater_ext.robustness.logits_model` if it does not).
    """
    start = time.perf_counter()
    model = robustness.logits_model(model, output, "masking_report")
    norm = robustness.check_norm(norm)
    eps = robustness.check_eps("masking_report", eps)
    default_tolerance = max(2.0, 300.0 / max(1, len(x)))
    tolerance = default_tolerance if tolerance is None else tolerance
    zero_tolerance = default_tolerance if zero_tolerance is None else zero_tolerance
    for name, value in (("tolerance", tolerance), ("zero_tolerance", zero_tolerance)):
        if not (math.isfinite(float(value)) and value >= 0):
            raise ValueError(f"ater_ext.masking_report: {name} must be finite and >= 0, got {value!r}")
    if autoattack is not None and (autoattack.norm != norm or autoattack.eps != eps or autoattack.n != len(x)):
        raise ValueError(f"ater_ext.masking_report: the AutoAttack result is for {autoattack.norm} eps="
                         f"{autoattack.eps} on {autoattack.n} points, the report for {norm} eps={eps} on {len(x)}")
    robustness.check_data_range("masking_report", x, (0.0, 1.0))
    robustness.check_logits("masking_report", model, x)
    device = torch.device(device) if device is not None else x.device
    x, y = x.detach().cpu(), y.detach().cpu()
    pgd = _pgd_name(norm)
    common = dict(batch_size=batch_size, seed=seed, device=device)
    clean = robustness.clean_correct(model, x, y, batch_size=batch_size, device=device)
    checks: List[Check] = []
    bar = robustness.progress_bar(6, "masking report", progress)

    # more steps and restarts
    by_steps = {s: robustness.pgd_robust_mask(model, x, y, pgd, eps, steps=s, **common) for s in PGD_STEPS}
    strongest = robustness.pgd_robust_mask(model, x, y, pgd, eps, steps=100, restarts=restarts, **common)
    strongest &= by_steps[100]
    acc = {f"pgd-{s}": percent(m) for s, m in by_steps.items()}
    acc[f"pgd-100x{restarts}"] = percent(strongest)
    last_gap = acc["pgd-50"] - acc[f"pgd-100x{restarts}"]
    checks.append(Check("more_steps", last_gap <= tolerance,
                        f"PGD accuracy 10 -> 100 steps -> {restarts} restarts: {acc['pgd-10']:.1f} -> "
                        f"{acc['pgd-100']:.1f} -> {acc[f'pgd-100x{restarts}']:.1f} % (50 steps to the strongest: "
                        f"{last_gap:+.1f} points, tolerance {tolerance})",
                        {"accuracy": acc, "excess_of_10_steps": acc["pgd-10"] - acc[f"pgd-100x{restarts}"]}))
    bar.update()

    # single step
    if norm == "linf":
        single = robustness.pgd_robust_mask(model, x, y, "fgsm", eps, **common)
    else:
        single = robustness.pgd_robust_mask(model, x, y, "pgd-l2", eps, steps=1, step_size=eps, **common)
    gap = acc["pgd-100"] - percent(single)
    checks.append(Check("single_step", gap <= tolerance,
                        f"single-step {percent(single):.1f} % vs PGD-100 {acc['pgd-100']:.1f} % (the single step "
                        f"beats PGD by {max(gap, 0):.1f} points, tolerance {tolerance})",
                        {"single_step_accuracy": percent(single), "pgd_100_accuracy": acc["pgd-100"]}))
    bar.update()

    # large radii
    curve = [(r, percent(robustness.pgd_robust_mask(model, x, y, pgd, r, steps=100, **common)))
             for r in _radii(eps, norm, x[0].numel())]
    top_r, top_acc = curve[-1]
    checks.append(Check("large_radius", top_acc <= zero_tolerance,
                        f"PGD-100 accuracy {top_acc:.1f} % at radius {top_r:.4g} (any input reachable); "
                        f"must be <= {zero_tolerance}",
                        {"curve": [{"eps": r, "accuracy": a} for r, a in curve]}))
    bar.update()

    # black box (Square) on what white-box attacks leave
    if autoattack is not None:
        square_stage = next(a for a in autoattack.per_attack if a["attack"] == "square")
        broken_pct = 100.0 * square_stage["broken"] / max(1, len(x))
        source = "AutoAttack's Square stage, after APGD-CE, APGD-T and FAB-T"
    else:
        survivors = strongest & single
        broken_pct = percent(_square_breaks(model, x, y, survivors, norm=norm, eps=eps, queries=square_queries,
                                            seed=seed, device=device))
        source = f"Square ({square_queries} queries) on the points that survive PGD and the single step"
    checks.append(Check("black_box", broken_pct <= tolerance,
                        f"{source} broke {broken_pct:.1f} % of the points (tolerance {tolerance})",
                        {"square_broke_percent": broken_pct, "source": source}))
    bar.update()

    # transfer from a surrogate
    if surrogate is not None:
        robustness.check_logits("masking_report (surrogate)", surrogate, x)
        transfer = clean.clone()
        fn = robustness.ATTACKS[pgd][0]
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            x_adv = fn(surrogate, xb, yb, eps, steps=100, clamp=(0.0, 1.0)).cpu()
            transfer[i:i + batch_size] &= ~robustness.verified_breaks(model, x_adv, x[i:i + batch_size],
                                                                      y[i:i + batch_size], norm=norm, eps=eps,
                                                                      device=device)
        gap = acc["pgd-100"] - percent(transfer)
        checks.append(Check("transfer", gap <= tolerance,
                            f"PGD-100 examples from the surrogate leave {percent(transfer):.1f} % vs white-box "
                            f"{acc['pgd-100']:.1f} % (transfer beats white-box by {max(gap, 0):.1f} points, "
                            f"tolerance {tolerance})",
                            {"transfer_accuracy": percent(transfer), "pgd_100_accuracy": acc["pgd-100"]}))
    bar.update()

    if autoattack is not None:
        checks.append(Check("autoattack_warnings", not autoattack.warnings,
                            "AutoAttack warned: " + " | ".join(autoattack.warnings) if autoattack.warnings
                            else "AutoAttack raised no warning",
                            {"warnings": list(autoattack.warnings),
                             "autoattack_accuracy": autoattack.robust_accuracy,
                             "pgd_minus_autoattack": acc[f"pgd-100x{restarts}"] - autoattack.robust_accuracy}))
    bar.update()
    bar.close()
    settings = {"restarts": restarts, "square_queries": square_queries if autoattack is None else None,
                "tolerance": tolerance, "zero_tolerance": zero_tolerance, "seed": seed,
                "surrogate": surrogate is not None, "autoattack": autoattack is not None,
                "pgd_step_size": "2.5 * eps / steps"}
    return MaskingReport(norm=norm, eps=eps, n=len(x), clean_accuracy=percent(clean), checks=checks,
                         seconds=time.perf_counter() - start, settings=settings)


def render_markdown(reports: Dict[str, MaskingReport]) -> str:
    """One section per model: the verdict, then each check with its verdict and numbers."""
    lines = ["# Gradient-masking report", ""]
    for label, report in reports.items():
        lines += [f"## {label}", "",
                  f"{report.norm} eps={report.eps:g}, {report.n} points, clean accuracy "
                  f"{report.clean_accuracy:.1f} %: **{report.verdict}**", "",
                  "| check | verdict | what was measured |", "|---|---|---|"]
        lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.summary} |" for c in report.checks]
        lines.append("")
    return "\n".join(lines)
