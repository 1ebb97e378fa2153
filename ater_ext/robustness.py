"""Robust accuracy as a reviewer expects it (SPEC section 5): PGD with random
starts and restarts, and AutoAttack's standard version from the reference
implementation (``pyautoattack``, fra31/auto-attack packaged), on any
``nn.Module`` and tensors (or a DataLoader, see :func:`collect`).

A point counts as robust only if the model classifies it correctly at the
clean input *and* at every adversarial point found for it (the worst case per
point over restarts, and over AutoAttack's four attacks). Accuracies are in
percent. Models run in eval mode (restored afterwards) and inputs must lie in
the declared data range (``[0, 1]`` by default; AutoAttack supports only that).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import attacks
from .outputs import OutputSpec, resolve_output

__all__ = ["ATTACKS", "NORMS", "check_data_range", "check_logits", "collect", "clean_correct",
           "pgd_robust_mask", "attack_accuracy", "percent",
           "verified_breaks", "progress_bar", "SelectedLogits", "logits_model", "AutoAttackResult", "autoattack", "perturbation_norms"]

Clamp = Tuple[float, float]

# attack name -> (function, norm, iterative?)
ATTACKS: Dict[str, Tuple[Callable, str, bool]] = {
    "fgsm": (attacks.fgsm, "linf", False),
    "pgd-l2": (attacks.pgd_l2, "l2", True),
    "pgd-linf": (attacks.pgd_linf, "linf", True),
}
NORMS = ("l2", "linf")
AUTOATTACK_NORMS = {"l2": "L2", "linf": "Linf"}


class SelectedLogits(nn.Module):
    """``model`` followed by the ``output=`` resolver: a module that returns the logits tensor."""

    def __init__(self, model: nn.Module, output: OutputSpec, op: str):
        super().__init__()
        self.model = model
        self.output = output
        self._pick = resolve_output(output, op=op)

    def forward(self, x: Tensor) -> Tensor:
        return self._pick(self.model(x))


def logits_model(model: nn.Module, output: OutputSpec = None, op: str = "robustness") -> nn.Module:
    """``model`` itself when it returns logits (``output=None``), else :class:`SelectedLogits`."""
    return model if output is None else SelectedLogits(model, output, op)


# ------------------------------------------------------------------- checks
def check_attack(name: str) -> Tuple[Callable, str, bool]:
    if name not in ATTACKS:
        raise ValueError(f"ater_ext.robustness: unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    return ATTACKS[name]


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"ater_ext.robustness: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return norm


def check_eps(op: str, eps: float) -> float:
    value = float(eps)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"ater_ext.robustness.{op}: eps must be finite and > 0, got {eps!r}")
    return value


def check_data_range(op: str, x: Tensor, clamp: Clamp) -> None:
    """x must lie in the declared data range (attacks clip to it; a wrong range hides robustness)."""
    lo, hi = float(x.min()), float(x.max())
    if lo < clamp[0] or hi > clamp[1]:
        raise ValueError(f"ater_ext.robustness.{op}: inputs span [{lo:.4g}, {hi:.4g}], outside the data range "
                         f"[{clamp[0]:g}, {clamp[1]:g}]; keep inputs in that range and put normalisation inside "
                         f"the model, or declare the range (clamp= / --data-range)")


def check_logits(op: str, model: nn.Module, x: Tensor, num_classes: Optional[int] = None) -> int:
    """The model maps a ``[B, ...]`` batch to ``[B, classes]`` logits; returns ``classes``."""
    with torch.no_grad(), attacks.model_mode(model, True):
        out = model(x[:2])
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x[:2].shape[0]:
        what = f"{type(out).__name__} {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"ater_ext.robustness.{op}: the model must return [B, classes] logits, got {what} for "
                         f"a batch of {x[:2].shape[0]} (output= picks them out of a tuple, dict or ModelOutput)")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(f"ater_ext.robustness.{op}: the model returns {out.shape[1]} logits per sample, the "
                         f"data has {num_classes} classes")
    return int(out.shape[1])


def collect(data, limit: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """``(x, y)`` from a pair of tensors or an iterable of ``(x, y)`` batches (a
    DataLoader), at most ``limit`` samples (the first ones)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    else:
        xs: List[Tensor] = []
        ys: List[Tensor] = []
        n = 0
        for batch in data:
            xb, yb = batch[0], batch[1]
            xs.append(xb)
            ys.append(yb)
            n += xb.shape[0]
            if limit is not None and n >= limit:
                break
        if not xs:
            raise ValueError("ater_ext.robustness.collect: the data yielded no batch")
        x, y = torch.cat(xs), torch.cat(ys)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"ater_ext.robustness.collect: x {list(x.shape)} and y {list(y.shape)} differ in size")
    return (x, y) if limit is None else (x[:limit], y[:limit])


# -------------------------------------------------------------- accuracies
@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch_size: int, device) -> Tensor:
    return torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def clean_correct(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 500, device=None) -> Tensor:
    """``[N]`` bool: correctly classified clean points (eval mode, restored)."""
    device = device or x.device
    with attacks.model_mode(model, True):
        return _predict(model, x, batch_size, device) == y.cpu()


def percent(mask: Tensor) -> float:
    """Share of True entries of a bool mask, in percent (exact for the count)."""
    return 100.0 * int(mask.sum()) / max(1, mask.numel())


def perturbation_norms(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    """``[N]`` per-sample distances ``||x_adv - x||`` in ``norm`` (float64)."""
    delta = (x_adv.double() - x.double()).reshape(x.shape[0], -1)
    return delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)


def verified_breaks(model: nn.Module, x_adv: Tensor, x: Tensor, y: Tensor, *, norm: str, eps: float,
                    batch_size: int = 500, device=None) -> Tensor:
    """``[N]`` bool: ``x_adv`` is misclassified and within ``eps`` of ``x`` (the
    check every adversarial point passes here before it counts)."""
    within = perturbation_norms(x_adv, x, norm) <= eps * (1 + 1e-5) + 1e-7
    return within & ~clean_correct(model, x_adv, y, batch_size=batch_size, device=device)


def progress_bar(total: int, desc: str, show: bool = True) -> tqdm:
    """A bar over ``total`` units that shows only on a terminal (and when ``show``)."""
    return tqdm(total=total, desc=desc, disable=None if show else True, leave=False, dynamic_ncols=True)


def pgd_robust_mask(model: nn.Module, x: Tensor, y: Tensor, attack: str, eps: float, *, steps: int = 10,
                    step_size: Optional[float] = None, restarts: int = 1, random_start: bool = False,
                    clamp: Clamp = (0.0, 1.0), batch_size: int = 500, seed: int = 0, device=None,
                    output: OutputSpec = None) -> Tensor:
    """``[N]`` bool: points classified correctly at ``x`` and at every restart's adversarial point.

    ``restarts`` is the number of attack runs per point; with ``restarts > 1``
    every run starts at a random point of the ball (Madry et al.), with one
    it does when ``random_start``. Random starts come from a private generator
    seeded by ``seed`` (the global RNG is untouched). FGSM has no steps or starts.
    ``step_size`` defaults to ``2.5 * eps / steps``. ``output``: where the
    logits are in the model's output (see :mod:`ater_ext.outputs`).
    """
    model = logits_model(model, output, "pgd_robust_mask")
    fn, _, iterative = check_attack(attack)
    eps = check_eps("pgd_robust_mask", eps)
    if isinstance(restarts, bool) or int(restarts) != restarts or restarts < 1:
        raise ValueError(f"ater_ext.robustness: restarts must be an integer >= 1, got {restarts!r}")
    device = device or x.device
    robust = clean_correct(model, x, y, batch_size=batch_size, device=device)
    runs = int(restarts) if iterative else 1
    generator = torch.Generator(device=device).manual_seed(seed)
    for run in range(runs):
        for i in range(0, len(x), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(x)))
            idx = idx[robust[idx]]  # a point already broken stays broken
            if len(idx) == 0:
                continue
            xb, yb = x[idx].to(device), y[idx].to(device)
            kwargs = {}
            if iterative:
                kwargs = dict(steps=steps, step_size=step_size, random_start=random_start or runs > 1,
                              generator=generator)
            x_adv = fn(model, xb, yb, eps, clamp=clamp, **kwargs)
            with torch.no_grad(), attacks.model_mode(model, True):
                robust[idx] = model(x_adv).argmax(1).cpu() == yb.cpu()
    return robust


def attack_accuracy(model: nn.Module, x: Tensor, y: Tensor, attack: str, eps: float, **kwargs) -> float:
    """Robust accuracy (%) under ``attack`` at ``eps``: see :func:`pgd_robust_mask`."""
    if float(eps) == 0:
        model = logits_model(model, kwargs.get("output"), "attack_accuracy")
        return percent(clean_correct(model, x, y, batch_size=kwargs.get("batch_size", 500),
                                     device=kwargs.get("device")))
    return percent(pgd_robust_mask(model, x, y, attack, eps, **kwargs))


# ---------------------------------------------------------------- AutoAttack
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
STANDARD_SQUARE_QUERIES = 5000


@dataclass
class AutoAttackResult:
    """AutoAttack's standard evaluation of one model at one norm and radius.

    ``robust_accuracy``: percent of points correct under all four attacks;
    ``per_attack``: one entry per attack in AutoAttack's order, with the robust
    accuracy after it (cumulative, as AutoAttack prints it), how many points it
    broke that the earlier ones had not, and its time; ``robust``: the ``[N]``
    mask; ``x_adv``: the adversarial point of each broken sample (``x`` where
    none was found); ``warnings``: the
    library's own warnings (randomised or dynamic defence, zero gradients,
    Square beating the white-box attacks), each once.
    """

    norm: str
    eps: float
    n: int
    clean_accuracy: float
    robust_accuracy: float
    per_attack: List[Dict[str, float]]
    warnings: List[str]
    seconds: float
    seed: int
    robust: Tensor = field(repr=False)
    x_adv: Tensor = field(repr=False)
    square_queries: int = STANDARD_SQUARE_QUERIES

    @property
    def version(self) -> str:
        """"standard" unless Square's query budget was changed (then "custom")."""
        return "standard" if self.square_queries == STANDARD_SQUARE_QUERIES else "custom"

    def to_dict(self) -> Dict[str, object]:
        d = {k: v for k, v in asdict(self).items() if k not in ("robust", "x_adv")}
        d["version"] = self.version
        d["attacks"] = list(STANDARD_ATTACKS)
        return d


class _Warnings(logging.Handler):
    """Collects the warnings pyautoattack logs (each message once, in order)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def _autoattack_logging():
    """pyautoattack's logger captured (not printed): its warnings are returned instead."""
    logger = logging.getLogger("auto-attack")
    handler = _Warnings()
    propagate, level = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = propagate, level


def autoattack(model: nn.Module, x: Tensor, y: Tensor, *, norm: str = "linf", eps: float, batch_size: int = 250,
               seed: int = 0, device=None, progress: bool = True,
               square_queries: int = STANDARD_SQUARE_QUERIES, output: OutputSpec = None) -> AutoAttackResult:
    """AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square; Croce &
    Hein 2020) through the reference code packaged as ``pyautoattack``.

    The attacks run one after the other on the points still robust, exactly as
    AutoAttack's own loop does, so that the per-attack breakdown is exact
    counts; every adversarial point is checked here (its distance to ``x`` is
    at most ``eps``, the model misclassifies it) before it counts. Inputs must
    be in ``[0, 1]`` (AutoAttack clips to it). pyautoattack seeds the global
    RNG; the caller's RNG state is restored afterwards. ``square_queries``
    other than 5000 makes it a custom (weaker) version, recorded as such: for
    smoke tests only. ``output``: where the logits are in the model's output.
    """
    from pyautoattack import AutoAttack
    from pyautoattack import checks as aa_checks

    op = "autoattack"
    model = logits_model(model, output, op)
    norm = check_norm(norm)
    eps = check_eps(op, eps)
    if x.dim() != 4:
        raise ValueError(f"ater_ext.robustness.autoattack: AutoAttack's Square attack needs image batches "
                         f"[B, C, H, W], got x {list(x.shape)}; reshape the inputs (and the model's first layer)")
    check_data_range(op, x, (0.0, 1.0))
    num_classes = check_logits(op, model, x)
    if num_classes < 4:
        raise ValueError(f"ater_ext.robustness.autoattack: the standard version's targeted attacks need at least "
                         f"4 classes, the model has {num_classes}")
    device = torch.device(device) if device is not None else x.device
    x, y = x.detach().cpu(), y.detach().cpu()
    start = time.perf_counter()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with attacks.model_mode(model, True), torch.random.fork_rng(devices=fork_devices), \
            _autoattack_logging() as log:
        aa = AutoAttack(model, norm=AUTOATTACK_NORMS[norm], eps=eps, version="standard", seed=seed, device=device)
        n_targets = min(9, num_classes - 1)
        aa.apgd_targeted.n_target_classes = n_targets
        aa.fab.n_target_classes = n_targets
        aa.square.n_queries = int(square_queries)
        robust = clean_correct(model, x, y, batch_size=batch_size, device=device)
        clean = percent(robust)
        x_found = x.clone()
        per_attack: List[Dict[str, float]] = []
        accuracy_after = {"clean": clean / 100.0}
        bar = tqdm(STANDARD_ATTACKS, desc=f"AutoAttack {norm} eps={eps:g}", disable=None if progress else True,
                   leave=False, dynamic_ncols=True)
        with bar:
            for name in bar:
                t0 = time.perf_counter()
                idx = robust.nonzero().flatten()
                broken = 0
                if len(idx):
                    aa.attacks_to_run = [name]
                    x_adv, _ = aa.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
                    fooled = verified_breaks(model, x_adv, x[idx], y[idx], norm=norm, eps=eps,
                                             batch_size=batch_size, device=device)
                    robust[idx[fooled]] = False
                    x_found[idx[fooled]] = x_adv[fooled].to(x_found.dtype)
                    broken = int(fooled.sum())
                acc = percent(robust)
                accuracy_after[name] = acc / 100.0
                per_attack.append({"attack": name, "robust_accuracy": acc, "broken": broken,
                                   "seconds": time.perf_counter() - t0})
                bar.set_postfix(robust=f"{acc:.1f}%")
        aa_checks.check_square_sr(accuracy_after, logger=logging.getLogger("auto-attack"))
    return AutoAttackResult(norm=norm, eps=eps, n=len(x), clean_accuracy=clean,
                            robust_accuracy=percent(robust), per_attack=per_attack,
                            warnings=list(log.messages), seconds=time.perf_counter() - start, seed=seed,
                            robust=robust, x_adv=x_found, square_queries=int(square_queries))
