"""ATER in PyTorch Lightning: :class:`ATERModule`, a ``LightningModule`` around any classifier.

``training_step`` returns :func:`ater_ext.objectives.ater_loss` (Lightning runs
the backward and the optimiser step) and logs its stats; ``validation_step``
logs the clean accuracy and the accuracy under an attack of
:mod:`ater_ext.attacks`. Attacks need input gradients, which Lightning's
default ``inference_mode`` forbids during validation: build the Trainer with
``Trainer(inference_mode=False)`` (the step then runs under ``torch.no_grad()``,
and the attack is called inside ``torch.enable_grad()``); with inference mode
on, the attack stops with an error that says so.

    trainer = pl.Trainer(max_epochs=10, inference_mode=False)
    trainer.fit(ATERModule(net, lam=0.1), train_loader, val_loader)

Importing this module imports ``pytorch_lightning``; ``import ater_ext`` does not.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from .. import attacks
from ..modules import ATERLoss
from ..outputs import OutputSpec, resolve_output

__all__ = ["ATERModule"]

ATTACKS = {"fgsm": attacks.fgsm, "pgd_l2": attacks.pgd_l2, "pgd_linf": attacks.pgd_linf}


class ATERModule(pl.LightningModule):
    """Trains ``net`` with ATER (Eq. 11), validates under an attack.

    Args:
        net: the classifier (``x -> logits``, or any output with ``output=``).
        lr: Adam's learning rate.
        eps_adv, eps, lam, xi: :func:`ater_ext.objectives.ater_loss`'s settings.
        attack: ``"pgd_l2"``, ``"pgd_linf"`` or ``"fgsm"`` for the validation accuracy.
        attack_eps: its radius; ``attack_kwargs`` go to it as well (``steps=``, ``clamp=``).
        output: where the logits are in ``net``'s output.

    Logged: ``train/loss``, ``train/ce``, ``train/adv``, ``train/energy``,
    ``val/acc``, ``val/robust_acc`` (epoch means).
    """

    def __init__(self, net: nn.Module, *, lr: float = 1e-3, eps_adv: float = 2.0, eps: float = 2.0,
                 lam: float = 0.1, xi: Optional[float] = None, attack: str = "pgd_l2", attack_eps: float = 1.0,
                 attack_kwargs: Optional[Dict[str, Any]] = None, output: OutputSpec = None):
        super().__init__()
        if attack not in ATTACKS:
            raise ValueError(f"ater_ext.ATERModule: attack must be one of {list(ATTACKS)}, got {attack!r}")
        self.net = net
        self.lr = float(lr)
        self.criterion = ATERLoss(eps_adv, eps, lam, xi=xi, output=output)
        self.attack = ATTACKS[attack]
        self.attack_eps = float(attack_eps)
        self.attack_kwargs = dict(attack_kwargs or {})
        self.output = output
        self.logits_of = resolve_output(output, op="ATERModule")

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_of(self.net(x))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.criterion(self.net, x, y)
        self.log_dict({f"train/{k}": float(v) for k, v in self.criterion.last_stats.items()},
                      on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        with torch.enable_grad():  # Lightning validates under no_grad; attacks need input gradients
            x_adv = self.attack(self.net, x, y, self.attack_eps, output=self.output, **self.attack_kwargs)
        with torch.no_grad():
            acc = (self(x).argmax(1) == y).float().mean()
            robust = (self(x_adv).argmax(1) == y).float().mean()
        self.log_dict({"val/acc": acc, "val/robust_acc": robust}, on_step=False, on_epoch=True,
                      batch_size=x.shape[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)
