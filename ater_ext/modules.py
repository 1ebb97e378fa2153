"""Module forms of the regulariser and the objectives, for loops built around loss modules.

Each is a thin ``nn.Module`` over the function of the same settings: the
settings are checked once, at construction, shown by ``repr``, and passed on
every call; the module holds no parameters and no state but ``last_stats``
(the stats dict of the last call)::

    criterion = ater_ext.ATERLoss(eps_adv=2.0, eps=2.0, lam=0.1)
    loss = criterion(model, x, y)          # = objectives.ater_loss(model, x, y, ...)[0]
    vat = ater_ext.VATLoss(xi=1e-6, eps=2.0, ip=1)
    loss = F.cross_entropy(model(x), y) + vat(model, x_ul)

A :class:`ater_ext.TrainStep` takes a loss module as its ``loss_fn`` and reports
its ``last_stats``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

from torch import Tensor, nn

from . import objectives
from .checks import check_choice, check_clamp, check_lam, check_positive, resolve_loss_fn
from .energy import DIRECTIONS, check_energy_settings, check_steps, energy_reg
from .outputs import OutputSpec, resolve_output
from .passes import LossFn, RngState, check_compile_mode

__all__ = ["EnergyReg", "ERMLoss", "ATLoss", "VATLoss", "ATERLoss", "VATERLoss"]


class _SettingsModule(nn.Module):
    """Settings checked at construction, shown by ``repr``; ``last_stats`` of the last call."""

    def __init__(self, op: str, settings: Dict[str, Any], *, loss_fn: Optional[LossFn] = None,
                 output: OutputSpec = None, compile: Optional[Union[bool, str]] = None):
        super().__init__()
        resolve_output(output, op=op)  # a bad output= fails here, not at the first batch
        if loss_fn is not None:
            resolve_loss_fn(loss_fn, op)
        if compile is not None:
            check_compile_mode(compile)
            settings["compile"] = compile
        settings.update({"output": output} if output is not None else {})
        settings.update({"loss_fn": loss_fn} if loss_fn is not None else {})
        self.settings = settings
        self.last_stats: Optional[Dict[str, Any]] = None

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self._shown().items())

    def _shown(self) -> Dict[str, Any]:
        return self.settings

    def _loss(self, result: Tuple[Tensor, Dict[str, Any]]) -> Tensor:
        loss, self.last_stats = result
        return loss


def _positive_or_none(op: str, name: str, value: Optional[float]) -> Optional[float]:
    return None if value is None else check_positive(op, name, value)


class EnergyReg(_SettingsModule):
    """``reg(model, x, y)`` = :func:`ater_ext.energy_reg` with these settings (same keywords).

    ``forward(model, x, y, *, grad_x=None, rng_state=None, scaler=None)``: the
    per-batch arguments stay per call. Returns the regulariser (a scalar for
    ``reduction="mean"``); add ``lam * reg(model, x, y)`` to your loss.
    ``last_stats``: the quality of the last ``x_max`` (``grad_norm``,
    ``xmax_grad_norm``, ``xmax_grad_ratio``; :func:`ater_ext.energy.xmax_stats`).
    """

    def __init__(self, eps: float = 2.0, *, xi: Optional[float] = None, loss_fn: Optional[LossFn] = None,
                 direction: str = "fd", penalty: str = "exact", clamp: Optional[Tuple[float, float]] = None,
                 reduction: str = "mean", fd_h: float = 1e-2, compile: Union[bool, str] = False,
                 output: OutputSpec = None, steps: int = 1):
        op = "EnergyReg"
        settings = check_energy_settings(op, eps=eps, xi=xi, direction=direction, clamp=clamp, fd_h=fd_h,
                                         penalty=penalty, reduction=reduction, steps=steps)
        super().__init__(op, settings, loss_fn=loss_fn, output=output, compile=compile)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, *, grad_x: Optional[Tensor] = None,
                rng_state: Optional[RngState] = None, scaler=None) -> Tensor:
        value, stats = energy_reg(model, x, y, grad_x=grad_x, rng_state=rng_state, scaler=scaler,
                                  return_stats=True, **self.settings)
        self.last_stats = objectives.detached_stats(**stats)
        return value


class ERMLoss(_SettingsModule):
    """``criterion(model, x, y)`` = :func:`ater_ext.objectives.erm_loss`'s loss."""

    def __init__(self, *, loss_fn: Optional[LossFn] = None, output: OutputSpec = None):
        super().__init__("ERMLoss", {}, loss_fn=loss_fn, output=output)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self._loss(objectives.erm_loss(model, x, y, **self.settings))


class ATLoss(_SettingsModule):
    """``criterion(model, x, y)`` = :func:`ater_ext.objectives.at_loss`'s loss (one-step L2 AT)."""

    def __init__(self, eps_adv: float = 2.0, *, loss_fn: Optional[LossFn] = None, clamp=None,
                 output: OutputSpec = None, bank_gradients: bool = True):
        op = "ATLoss"
        super().__init__(op, {"eps_adv": check_positive(op, "eps_adv", eps_adv), "clamp": check_clamp(op, clamp),
                              "bank_gradients": bool(bank_gradients)}, loss_fn=loss_fn, output=output)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return self._loss(objectives.at_loss(model, x, y, **self.settings))


class VATLoss(_SettingsModule):
    """``vat(model, x)`` = the VAT term of :func:`ater_ext.objectives.vat_loss`, with
    VAT's own argument order: ``VATLoss(xi, eps, ip)`` is ``vat_loss(xi_vat=xi,
    eps_vat=eps, ip=ip)`` (``xi=None``: the dtype rule, 1e-6 in fp64, 1e-3 in fp32).
    """

    def __init__(self, xi: Optional[float] = None, eps: float = 2.0, ip: int = 1, *, output: OutputSpec = None):
        op = "VATLoss"
        super().__init__(op, {"xi_vat": _positive_or_none(op, "xi", xi), "eps_vat": check_positive(op, "eps", eps),
                              "ip": objectives.check_ip(op, ip)}, output=output)

    def _shown(self) -> Dict[str, Any]:
        names = {"xi_vat": "xi", "eps_vat": "eps"}
        return {names.get(k, k): v for k, v in self.settings.items()}

    def forward(self, model: nn.Module, x: Tensor) -> Tensor:
        return self._loss(objectives.vat_loss(model, x, **self.settings))


def _maximiser(op: str, direction: str, steps: int) -> Dict[str, Any]:
    """The x_max settings (``direction``, ``steps``), checked; shown only when not the paper's."""
    check_choice(op, "direction", direction, DIRECTIONS)
    steps = check_steps(op, steps)
    return {**({"direction": direction} if direction != "fd" else {}), **({"steps": steps} if steps != 1 else {})}


class ATERLoss(_SettingsModule):
    """``criterion(model, x, y)`` = :func:`ater_ext.objectives.ater_loss`'s loss (Eq. 11);
    ``forward(model, x, y, *, scaler=None)``. ``direction`` / ``steps``: the
    ``x_max`` maximiser (:func:`ater_ext.x_max`; default the paper's one-step FD)."""

    def __init__(self, eps_adv: float = 2.0, eps: float = 2.0, lam: float = 0.1, *, xi: Optional[float] = None,
                 loss_fn: Optional[LossFn] = None, clamp=None, compile: Union[bool, str] = False,
                 output: OutputSpec = None, bank_gradients: bool = True, direction: str = "fd", steps: int = 1):
        op = "ATERLoss"
        super().__init__(op, {"eps_adv": check_positive(op, "eps_adv", eps_adv), "eps": check_positive(op, "eps", eps),
                              "lam": check_lam(op, lam), "xi": _positive_or_none(op, "xi", xi),
                              "clamp": check_clamp(op, clamp), "bank_gradients": bool(bank_gradients),
                              **_maximiser(op, direction, steps)},
                         loss_fn=loss_fn, output=output, compile=compile)

    def forward(self, model: nn.Module, x: Tensor, y: Tensor, *, scaler=None) -> Tensor:
        return self._loss(objectives.ater_loss(model, x, y, scaler=scaler, **self.settings))


class VATERLoss(_SettingsModule):
    """``criterion(model, x_l, y_l, x_ul)`` = :func:`ater_ext.objectives.vater_loss`'s loss
    (Eq. 12, semi-supervised); ``forward(model, x_l, y_l, x_ul, *, scaler=None)``.
    ``direction`` / ``steps`` as in :class:`ATERLoss`."""

    def __init__(self, eps_vat: float = 2.0, eps: float = 2.0, lam: float = 0.1, *, xi: Optional[float] = None,
                 xi_vat: Optional[float] = None, ip: int = 1, loss_fn: Optional[LossFn] = None, clamp=None,
                 compile: Union[bool, str] = False, output: OutputSpec = None, direction: str = "fd",
                 steps: int = 1):
        op = "VATERLoss"
        super().__init__(op, {"eps_vat": check_positive(op, "eps_vat", eps_vat), "eps": check_positive(op, "eps", eps),
                              "lam": check_lam(op, lam), "xi": _positive_or_none(op, "xi", xi),
                              "xi_vat": _positive_or_none(op, "xi_vat", xi_vat), "ip": objectives.check_ip(op, ip),
                              "clamp": check_clamp(op, clamp), **_maximiser(op, direction, steps)},
                         loss_fn=loss_fn, output=output, compile=compile)

    def forward(self, model: nn.Module, x_l: Tensor, y_l: Tensor, x_ul: Tensor, *, scaler=None) -> Tensor:
        return self._loss(objectives.vater_loss(model, x_l, y_l, x_ul, scaler=scaler, **self.settings))
