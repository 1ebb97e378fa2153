"""Argument checks shared by the public functions, and the ``loss_fn`` contract.

Every check raises before any pass runs, with a message that names the
function (``ater_ext.<op>``), the option and what it got.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["check_positive", "check_nonnegative", "check_lam", "check_choice", "check_batch", "check_clamp", "check_trainable",
           "check_grad_mode", "resolve_loss_fn", "CheckedLoss"]

LossFn = Callable[..., Tensor]


def _finite(op: str, name: str, value, positive: bool, dtype: Optional[torch.dtype]) -> float:
    bound = "> 0" if positive else ">= 0"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"ater_ext.{op}: {name} must be a finite number {bound}, got {value!r}") from None
    if not (math.isfinite(number) and (number > 0 if positive else number >= 0)):
        raise ValueError(f"ater_ext.{op}: {name} must be finite and {bound}, got {number}")
    if dtype is not None and dtype.is_floating_point and number > torch.finfo(dtype).max:
        raise ValueError(f"ater_ext.{op}: {name}={number:g} is beyond the range of the inputs' dtype {dtype} "
                         f"(max {torch.finfo(dtype).max:g}): the points it gives would be inf / NaN")
    return number


def check_positive(op: str, name: str, value: float, dtype: Optional[torch.dtype] = None) -> float:
    """``value`` as a float; ValueError naming ``op`` unless it is finite, > 0 and
    (given ``dtype``) inside that floating dtype's range, where it would give inf / NaN steps."""
    return _finite(op, name, value, True, dtype)


def check_nonnegative(op: str, name: str, value: float, dtype: Optional[torch.dtype] = None) -> float:
    """As :func:`check_positive`, with 0 allowed."""
    return _finite(op, name, value, False, dtype)


def check_lam(op: str, lam: float) -> float:
    """The energy weight ``lam`` as a float; ValueError unless finite and >= 0."""
    return check_nonnegative(op, "lam (the energy term's weight)", lam)


def check_choice(op: str, name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"ater_ext.{op}: {name} must be one of {list(choices)}, got {value!r}")


def check_batch(op: str, x: Tensor, y: Optional[Tensor] = None, grad_x: Optional[Tensor] = None) -> None:
    """x is a [B, ...] floating batch; y and grad_x match it (grad_x also in dtype and device: never cast)."""
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"ater_ext.{op}: x must be a floating [B, ...] tensor, got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')} {list(getattr(x, 'shape', []))}")
    if y is not None and (not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]):
        raise ValueError(f"ater_ext.{op}: x and y must have the same batch size, got x {list(x.shape)} "
                         f"and y {list(getattr(y, 'shape', [])) if isinstance(y, Tensor) else type(y).__name__}")
    if grad_x is None:
        return
    if not isinstance(grad_x, Tensor) or grad_x.shape != x.shape:
        raise ValueError(f"ater_ext.{op}: grad_x must have x's shape, got grad_x "
                         f"{list(grad_x.shape) if isinstance(grad_x, Tensor) else type(grad_x).__name__} "
                         f"and x {list(x.shape)}")
    if grad_x.dtype != x.dtype or grad_x.device != x.device:
        raise ValueError(f"ater_ext.{op}: grad_x must have x's dtype and device, got grad_x {grad_x.dtype} on "
                         f"{grad_x.device} and x {x.dtype} on {x.device} (it is not cast: convert it yourself "
                         f"if that is what you mean)")


def check_clamp(op: str, clamp) -> Optional[Tuple[float, float]]:
    if clamp is None:
        return None
    try:
        lo, hi = (float(v) for v in clamp)
    except (TypeError, ValueError):
        raise ValueError(f"ater_ext.{op}: clamp must be a pair (lo, hi), got {clamp!r}") from None
    if not lo < hi:
        raise ValueError(f"ater_ext.{op}: clamp needs lo < hi, got {clamp!r}")
    return lo, hi


def _check_not_inference_mode(op: str) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"ater_ext.{op}: called under torch.inference_mode(), where no input gradient can be "
                           f"taken; PyTorch Lightning runs validation and test steps in it: build the Trainer "
                           f"with inference_mode=False (and wrap the call in torch.enable_grad())")


def check_grad_mode(op: str, x: Tensor) -> None:
    """Input gradients are impossible under ``torch.inference_mode()`` and for inference tensors."""
    _check_not_inference_mode(op)
    if x.is_inference():
        raise RuntimeError(f"ater_ext.{op}: x is an inference tensor (made under torch.inference_mode()), which "
                           f"autograd cannot use; pass x.clone() made outside inference mode")


def check_trainable(op: str, model: nn.Module) -> None:
    """The penalty is differentiable w.r.t. the parameters: grad mode on, some parameter trainable."""
    _check_not_inference_mode(op)
    if not torch.is_grad_enabled():
        raise RuntimeError(f"ater_ext.{op}: gradients are disabled (torch.no_grad() or inference_mode), "
                           f"but the penalty must be differentiable with respect to the parameters; "
                           f"call it with grad enabled (use ater_ext.x_max to only find x_max)")
    if not any(p.requires_grad for p in model.parameters()):
        raise RuntimeError(f"ater_ext.{op}: the model has no parameter that requires grad, so the penalty "
                           f"cannot train anything")


# ------------------------------------------------------------ loss_fn contract
_REDUCTIONS = ("none", "sum", "mean")


def _takes_reduction(fn: Callable) -> Optional[bool]:
    """Whether ``fn`` accepts ``reduction=`` (None when its signature cannot be read)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return any(p.name == "reduction" or p.kind == p.VAR_KEYWORD for p in params)


class CheckedLoss:
    """``loss_fn(logits, y, reduction=...)`` with its contract checked.

    Up front: ``loss_fn`` must take ``reduction=`` (as ``F.cross_entropy``); a
    ``torch.nn`` loss module with a ``reduction`` attribute (``nn.CrossEntropyLoss(
    label_smoothing=0.1)``) is used through copies with ``reduction`` set. On
    every call: ``reduction="none"`` must give per-sample losses ``[B]``,
    ``"sum"`` and ``"mean"`` a scalar. Equal (and hashed) by the wrapped
    function, so caches keyed by it (the compiled passes) are shared.
    """

    def __init__(self, loss_fn: Optional[LossFn], op: str):
        self.fn = F.cross_entropy if loss_fn is None else loss_fn
        self.op = op
        self._copies: Dict[str, nn.Module] = {}
        if isinstance(self.fn, nn.Module) and isinstance(getattr(self.fn, "reduction", None), str):
            self._module = True
            return
        self._module = False
        if not callable(self.fn):
            raise TypeError(f"ater_ext.{op}: loss_fn must be callable as loss_fn(logits, y, reduction=...), "
                            f"got {type(self.fn).__name__}")
        if _takes_reduction(self.fn.forward if isinstance(self.fn, nn.Module) else self.fn) is False:
            raise TypeError(f"ater_ext.{op}: loss_fn must take reduction= ('none' per-sample losses [B], 'sum', "
                            f"'mean') like F.cross_entropy; {getattr(self.fn, '__name__', type(self.fn).__name__)}"
                            f" does not (wrap it, e.g. functools.partial(F.cross_entropy, label_smoothing=0.1))")

    def _call(self, logits: Tensor, y, reduction: str) -> Tensor:
        if not self._module:
            return self.fn(logits, y, reduction=reduction)
        if reduction not in self._copies:
            clone = copy.copy(self.fn)
            clone.reduction = reduction
            self._copies[reduction] = clone
        return self._copies[reduction](logits, y)

    def __call__(self, logits: Tensor, y, reduction: str = "mean") -> Tensor:
        out = self._call(logits, y, reduction)
        want = [logits.shape[0]] if reduction == "none" else []
        if not isinstance(out, Tensor) or list(out.shape) != want or not out.is_floating_point():
            what = (f"a {out.dtype} tensor {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__)
            raise ValueError(f"ater_ext.{self.op}: loss_fn(logits {list(logits.shape)}, y, reduction={reduction!r}) "
                             f"must return a floating tensor {want} ({'per-sample losses' if want else 'a scalar'}),"
                             f" got {what}")
        return out

    def __eq__(self, other) -> bool:
        return isinstance(other, CheckedLoss) and other.fn is self.fn

    def __hash__(self) -> int:
        return hash(("CheckedLoss", id(self.fn)))

    def __repr__(self) -> str:
        return f"CheckedLoss({self.fn!r})"


def resolve_loss_fn(loss_fn: Optional[LossFn], op: str = "loss_fn") -> CheckedLoss:
    """``loss_fn`` (``F.cross_entropy`` when None) with its contract checked (see :class:`CheckedLoss`)."""
    if isinstance(loss_fn, CheckedLoss):
        return loss_fn
    return CheckedLoss(loss_fn, op)
