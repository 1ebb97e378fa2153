"""ater_ext: energy-regularised adversarial training (ATER / VATER) for PyTorch.

Zhang, Huang and Xu, "On Model Robustness Against Adversarial Examples"
(AAAI 2020). ``energy_reg`` is the drop-in regulariser::

    loss = F.cross_entropy(model(x), y) + lam * ater_ext.energy_reg(model, x, y)

:mod:`ater_ext.objectives` has the ERM / AT / VAT / ATER / VATER losses, the
fused batched ops live in :mod:`ater_ext.ops` (also ``torch.ops.ater_ext.*``),
:mod:`ater_ext.reference` holds pure-PyTorch twins of all of it, and
:class:`TrainStep` runs a whole training step, optionally replayed from a CUDA graph, and
:func:`backward_into_parameters` is the backward it runs (no gradient for the penalty's ``x_max``).
"""
from . import objectives, ops, reference
from ._loader import BUILD_CPU_ISA
from .energy import default_xi, energy_reg, x_max
from .passes import capture_rng_state
from .train_step import TrainStep, backward_into_parameters

__version__ = "0.1.0"

__all__ = ["energy_reg", "x_max", "default_xi", "capture_rng_state", "TrainStep", "backward_into_parameters",
           "objectives", "ops", "reference", "BUILD_CPU_ISA", "__version__"]
