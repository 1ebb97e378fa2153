"""Integrations with training frameworks, each imported only when used.

* :mod:`ater_ext.integrations.lightning`: a PyTorch Lightning ``LightningModule``
  that trains with ATER and evaluates under an attack (needs ``pytorch-lightning``).

Hugging Face Accelerate and ``torchrun`` need no adapter: the README's "Use it
in your training loop" shows the few lines each takes.
"""
import importlib as _importlib

_LAZY = ("lightning",)

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ater_ext.integrations' has no attribute {name!r}")
