"""ater_ext: energy-regularised adversarial training (ATER / VATER) for PyTorch.

Zhang, Huang and Xu, "On Model Robustness Against Adversarial Examples"
(AAAI 2020). ``energy_reg`` is the drop-in regulariser::

    loss = F.cross_entropy(model(x), y) + lam * ater_ext.energy_reg(model, x, y)

:mod:`ater_ext.objectives` has the ERM / AT / VAT / ATER / VATER losses (and
:class:`EnergyReg`, :class:`ATERLoss`, ... are their module forms), the fused
batched ops live in :mod:`ater_ext.ops` (also ``torch.ops.ater_ext.*``),
:mod:`ater_ext.attacks` and :mod:`ater_ext.metrics` evaluate robustness
(:mod:`ater_ext.robustness` adds restarts and AutoAttack, :mod:`ater_ext.masking` the
gradient-masking report), :mod:`ater_ext.atomic_io` writes result files atomically,
:mod:`ater_ext.reference` holds pure-PyTorch twins of all of it, and
:class:`TrainStep` runs a whole training step, optionally replayed from a CUDA graph, and
:func:`backward_into_parameters` is the backward it runs (no gradient for the penalty's ``x_max``).

Every submodule is reachable as an attribute after ``import ater_ext``; those
that pull in optional or heavy dependencies (``ater_ext.integrations.lightning``,
``ater_ext.data``, ``ater_ext.cli``) are imported on first access.
"""
import importlib as _importlib

from . import (atomic_io, attacks, checks, energy, gradient_bank, integrations, masking, metrics, models, modules,
               objectives, ops, outputs, passes, preprocessing, randomness, reference, robustness, train_step,
               xmax_study)
from ._loader import BUILD_CPU_ISA
from .energy import default_xi, energy_reg, x_max
from .modules import ATERLoss, ATLoss, EnergyReg, ERMLoss, VATERLoss, VATLoss
from .outputs import resolve_output
from .passes import capture_rng_state
from .train_step import TrainStep, backward_into_parameters

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("data", "cli")

__all__ = ["energy_reg", "x_max", "default_xi", "capture_rng_state", "resolve_output", "TrainStep",
           "backward_into_parameters", "EnergyReg", "ERMLoss", "ATLoss", "VATLoss", "ATERLoss", "VATERLoss",
           "attacks", "metrics", "objectives", "ops", "reference", "models", "outputs", "modules", "integrations",
           "energy", "passes", "randomness", "checks", "gradient_bank", "train_step", "robustness", "masking",
           "atomic_io", "preprocessing", "xmax_study", "BUILD_CPU_ISA",
           "__version__"]


def __getattr__(name: str):
    """``ater_ext.data`` and ``ater_ext.cli`` on first access (the library floors never import them)."""
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ater_ext' has no attribute {name!r}")
