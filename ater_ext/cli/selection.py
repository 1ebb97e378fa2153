"""Checkpoint selection on a validation split, never on the test set (SPEC
section 5).

``ater-train`` holds out ``--val-size`` training images, balanced over the
classes and drawn with the run's ``--seed``; they are never trained on. After
every epoch it measures on them the clean error (``val_error``) and, on a
fixed subset of at most ``--select-subset`` of them, the accuracy under 10-step
PGD at the training radius in the training norm (``val_robust_acc``; the radius
is ``--eps-adv`` for erm/at/ater and the baselines, ``--eps-vat`` for vat/vater;
L2 but for ``--norm linf`` runs). ``best.pt`` is the epoch with
the lowest ``val_error`` (``--select clean``) or the highest
``val_robust_acc`` (``--select robust``); the test set is only reported.
With ``--val-size 0`` there is no validation set and ``best.pt`` is the last
epoch.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .. import robustness
from ..data import Dataset, balanced_label_split
from .common import CliError, spread_subset

SELECTIONS = ("clean", "robust")

# Default validation sizes (images held out of the training set), one tenth or less of
# it and a multiple of the 10 classes: mnist-5k 4000 -> 500, digits 1433 -> 200,
# MNIST / Fashion-MNIST 60000, CIFAR-10 50000 and SVHN 73257 -> 5000 (the size Madry et al.
# and many papers hold out of CIFAR-10; VAT's paper tuned on a validation set too).
DEFAULT_VAL_SIZE = {"mnist-5k": 500, "digits": 200, "mnist": 5000, "fashion-mnist": 5000, "cifar10": 5000,
                    "svhn": 5000}
SELECT_STEPS = 10  # PGD steps of the robust validation accuracy


def split_validation(data: Dataset, val_size: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``(train, val)`` index tensors into ``data.x_train``: ``val_size`` images,
    ``val_size / classes`` per class, drawn with ``seed``; the rest train."""
    n = len(data.y_train)
    if val_size == 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.long)
    if val_size < 0 or val_size >= n:
        raise CliError(f"--val-size must be in [0, {n}) for {data.name} ({n} training images), got {val_size}")
    classes = data.num_classes
    if val_size % classes:
        raise CliError(f"--val-size {val_size} is not divisible by the {classes} classes of {data.name} "
                       f"(the split is balanced)")
    smallest = int(torch.bincount(data.y_train, minlength=classes).min())
    if val_size // classes >= smallest:
        raise CliError(f"--val-size {val_size} takes {val_size // classes} images a class, but a class of "
                       f"{data.name} has only {smallest} training images")
    val, train = balanced_label_split(data.y_train, val_size, classes, seed)
    return train, val


def selection_radius(method: str, eps_adv: float, eps_vat: float) -> float:
    """The radius the method trains at (the robust selection's PGD radius)."""
    return eps_vat if method in ("vat", "vater") else eps_adv


class Validation:
    """The per-epoch validation figures and the best epoch so far."""

    def __init__(self, data: Dataset, val_idx: Tensor, *, select: str, radius: float, subset: int, device,
                 norm: str = "l2"):
        if select not in SELECTIONS:
            raise CliError(f"--select must be one of {', '.join(SELECTIONS)}, got {select!r}")
        self.enabled = len(val_idx) > 0
        self.select, self.radius, self.device = select, radius, device
        self.attack = "pgd-linf" if norm == "linf" else "pgd-l2"
        self.x, self.y = data.x_train[val_idx], data.y_train[val_idx]
        sub = spread_subset(len(val_idx), subset)
        self.x_robust, self.y_robust = self.x[sub], self.y[sub]

    def measure(self, model) -> Dict[str, float]:
        """``val_error`` (%) and ``val_robust_acc`` (%) of ``model`` (its mode restored)."""
        if not self.enabled:
            return {}
        correct = robustness.clean_correct(model, self.x, self.y, device=self.device)
        robust = robustness.attack_accuracy(model, self.x_robust, self.y_robust, self.attack, self.radius,
                                            steps=SELECT_STEPS, device=self.device)
        return {"val_error": 100.0 - robustness.percent(correct), "val_robust_acc": robust}

    def score(self, row: Dict[str, float]) -> Tuple[float, float]:
        """The row's selection key, lower is better: the selected error, then the other as a tie-break."""
        robust_error = 100.0 - row["val_robust_acc"]
        return (row["val_error"], robust_error) if self.select == "clean" else (robust_error, row["val_error"])

    def best_epoch(self, history: List[Dict[str, float]]) -> int:
        """The selected epoch of ``history`` (the earliest among equals); the last one without validation."""
        if not self.enabled:
            return int(history[-1]["epoch"])
        return int(min(history, key=lambda row: (self.score(row), row["epoch"]))["epoch"])
