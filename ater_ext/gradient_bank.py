"""Parameter gradients computed early and handed over in the caller's backward.

``at_loss`` and ``ater_loss`` compute each first-order term's parameter
gradients as soon as the term exists, so its graph is freed at once instead of
living through the penalty's double backward; the loss they return carries
those gradients and hands them to the parameters in the caller's ordinary
``backward()`` (once: it is not twice differentiable, and a backward with
``create_graph=True`` raises, naming ``bank_gradients=False``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["owned_gradients", "GradientBank", "banked_term"]


class _PrecomputedGradients(torch.autograd.Function):
    """A scalar (``value``) whose backward hands ``grads`` (already computed,
    scaled in place by the incoming gradient) to ``params``. The buffers are
    handed over, not copied, so they can be backpropagated once only."""

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = list(grads)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # backward(create_graph=True) / autograd.grad(create_graph=True)
            raise RuntimeError("ater_ext: at_loss / ater_loss hand over parameter gradients computed early, which "
                               "are constants: a backward with create_graph=True through them would give wrong "
                               "higher-order gradients; pass bank_gradients=False for a loss with plain graphs "
                               "(twice differentiable)")
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("ater_ext: the clean and adversarial loss terms of at_loss / ater_loss carry "
                               "precomputed parameter gradients and can be backpropagated only once "
                               "(no retain_graph)")
        return (None, None, *[None if g is None else g.mul_(grad_out) for g in grads])


def _strided(t: Optional[Tensor]) -> bool:
    return t is not None and t.layout == torch.strided


def _span(t: Tensor) -> Tuple[int, int]:
    """The bytes a dense tensor covers."""
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _overlap(a: Tuple[int, int], b: Tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def owned_gradients(grads: Sequence[Optional[Tensor]], held: Sequence[Optional[Tensor]] = ()
                    ) -> List[Optional[Tensor]]:
    """``grads`` (as ``torch.autograd.grad`` returns them) made safe to update in place.

    autograd may hand one tensor to several inputs (``w1 + w2``; ``x + p`` gives
    ``p`` the input gradient's tensor) or an expanded, stride-0 view
    (``p.sum()``): strided gradients that are not dense, or whose memory
    overlaps another one's or a tensor's in ``held`` (already owned), are
    copied. Sparse gradients are always copied: their values can be another
    gradient's tensor (``F.embedding(..., sparse=True) + p``).
    """
    owned = [g.clone() if g is not None and not (_strided(g) and (g.is_contiguous() or g.is_contiguous(
        memory_format=torch.channels_last))) else g for g in grads]
    spans = sorted(_span(t) for t in (*held, *owned) if _strided(t))
    if all(a[1] <= b[0] for a, b in zip(spans, spans[1:])):  # the usual case: all disjoint
        return owned
    taken = [_span(t) for t in held if _strided(t)]
    for i, g in enumerate(owned):
        if _strided(g):
            if any(_overlap(_span(g), other) for other in taken):
                owned[i] = g = g.clone()
            taken.append(_span(g))
    return owned


class GradientBank:
    """Parameter gradients of loss terms, banked as each term is computed.

    Args:
        params: the parameters (those that require grad).
        grads: their first gradients, from :func:`owned_gradients` (the bank
            updates them in place), each divided by ``divide_by``.
    """

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]], divide_by: float = 1.0):
        self.params = list(params)
        self.grads = [None if g is None else (g.div_(divide_by) if divide_by != 1.0 else g) for g in grads]

    def add(self, loss: Tensor) -> None:
        """Adds ``loss``'s parameter gradients (its graph is freed)."""
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        fresh = owned_gradients([g if held is None else None for g, held in zip(grads, self.grads)],
                                held=self.grads)
        for i, (g, new) in enumerate(zip(grads, fresh)):
            if new is not None:
                self.grads[i] = new
            elif g is not None:
                self.grads[i].add_(g)  # g is only read: no aliasing concern

    def loss(self, value: Tensor) -> Tensor:
        """``value`` (detached) whose backward gives the banked gradients (once; not twice differentiable)."""
        return _PrecomputedGradients.apply(value.detach(), tuple(self.grads), *self.params)


def banked_term(bank: Optional[GradientBank], term: Tensor) -> Tensor:
    """Banks ``term``'s parameter gradients now (freeing its graph) when there
    is a bank, and returns it detached; without a bank returns it as it is."""
    if bank is None:
        return term
    bank.add(term)
    return term.detach()
