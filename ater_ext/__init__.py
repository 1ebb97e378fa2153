"""ater_ext: energy-regularised adversarial training (ATER / VATER) for PyTorch.

Zhang, Huang and Xu, "On Model Robustness Against Adversarial Examples"
(AAAI 2020). The fused batched ops live in :mod:`ater_ext.ops` (also as
``torch.ops.ater_ext.*``); :mod:`ater_ext.reference` holds their pure-PyTorch
twins.
"""
from . import ops, reference
from ._loader import BUILD_CPU_ISA

__version__ = "0.1.0"

__all__ = ["ops", "reference", "BUILD_CPU_ISA", "__version__"]
