"""The non-finite guard of ``ater-train``: a loss, gradient or parameter that
turns NaN or Inf stops the run with a clear message (exit code 2) before
anything non-finite is written, or, with ``--on-nonfinite skip``, the step is
skipped the way ``GradScaler`` skips a step with non-finite gradients."""
from __future__ import annotations

import math
from typing import Iterable, List, Optional

import torch
from torch import Tensor

from .common import CliError

POLICIES = ("stop", "skip")


class NonFiniteError(CliError):
    """Training produced a NaN or Inf; nothing non-finite was saved."""


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor is free of NaN and Inf, in one device sync."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)  # a NaN or Inf anywhere makes its tensor's norm non-finite
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


class NonFiniteGuard:
    """Checks one training step at a time; ``where`` strings name epoch and step."""

    LOWER = "lower --lr or the radii (--eps, --eps-adv, --eps-vat)"
    HINT = LOWER + ", or pass --on-nonfinite skip"

    def __init__(self, policy: str, params: List[Tensor], out: str):
        if policy not in POLICIES:
            raise CliError(f"--on-nonfinite must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.params, self.out = policy, params, out
        self.skipped = 0

    def _stop(self, what: str, where: str) -> NonFiniteError:
        return NonFiniteError(f"{what} at {where}; stopped before saving it (the last finite checkpoint is "
                              f"{self.out}/last.pt, if any); {self.HINT}")

    def step_problem(self, loss: float, *, check_grads: bool = True) -> Optional[str]:
        """Before ``optimizer.step()``: what is non-finite in this step (None if
        nothing). ``loss`` is the step's loss value, already on the host; the
        gradients are read here unless a GradScaler, which skips such steps
        itself, owns them (``check_grads=False``)."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if check_grads and not all_finite(p.grad for p in self.params):
            return "non-finite gradients"
        return None

    def take_step(self, problem: Optional[str], where: str) -> bool:
        """True to take the step; False to skip it (skip policy); raises under
        the stop policy. Separate from :meth:`step_problem` so that ranks can
        agree on ``problem`` first and all stop or skip together."""
        if problem is None:
            return True
        if self.policy == "stop":
            raise self._stop(problem, where)
        self.skipped += 1
        return False

    def check_parameters(self, where: str) -> None:
        """After ``optimizer.step()``: the parameters must still be finite (a step
        cannot be undone, so this stops under either policy)."""
        if not all_finite(self.params):
            raise self._stop("non-finite parameters after the optimiser step", where)
