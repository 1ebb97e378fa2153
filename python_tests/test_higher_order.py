"""Higher-order gradients through the losses (issue 13, item 6).

``at_loss`` / ``ater_loss`` hand over parameter gradients computed early
(constants), so a backward with ``create_graph=True`` through them used to
give silently wrong second-order gradients. It now raises, naming
``bank_gradients=False``, whose plain graphs give the reference's exact
second-order gradients (fp64 tanh MLP: third derivatives are not zero)."""
from __future__ import annotations

import pytest
import torch

import ater_ext
from ater_ext import objectives as O
from ater_ext import reference as R

from _models import close_grads, make, params


def _second_order(loss, model):
    """d/dtheta ||d loss / d theta||^2: needs the gradient's own graph."""
    ps = params(model)
    grads = torch.autograd.grad(loss, ps, create_graph=True)
    return torch.autograd.grad(sum((g * g).sum() for g in grads), ps)


LOSSES = {
    "at_loss": (lambda m, x, y, **kw: O.at_loss(m, x, y, **kw)[0], lambda m, x, y: R.ref_at_loss(m, x, y)),
    "ater_loss": (lambda m, x, y, **kw: O.ater_loss(m, x, y, **kw)[0], lambda m, x, y: R.ref_ater_loss(m, x, y)),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_create_graph_through_banked_gradients_raises(name):
    model, x, y = make("tanh")
    ours, _ = LOSSES[name]
    with pytest.raises(RuntimeError, match=r"create_graph=True .* pass bank_gradients=False"):
        torch.autograd.grad(ours(model, x, y), params(model), create_graph=True)
    with pytest.raises(RuntimeError, match="bank_gradients=False"):
        ours(model, x, y).backward(create_graph=True)
    with pytest.raises(RuntimeError, match="bank_gradients=False"):
        _second_order(ater_ext.ATERLoss()(model, x, y), model)


# BatchNorm has no third derivative, which ATER's second order needs (its penalty is a first derivative)
@pytest.mark.parametrize("name,kind", [("at_loss", "tanh"), ("at_loss", "bn"), ("ater_loss", "tanh")])
def test_plain_graphs_give_the_reference_second_order_gradients(name, kind):
    model, x, y = make(kind)
    ours, ref = LOSSES[name]
    close_grads(_second_order(ours(model, x, y, bank_gradients=False), model),
                _second_order(ref(model, x, y), model), 1e-9, f"{name} second order")
    # first order unchanged by the option
    a = torch.autograd.grad(ours(model, x, y, bank_gradients=False), params(model))
    b = torch.autograd.grad(ours(model, x, y), params(model))
    close_grads(a, b, 1e-12, f"{name} first order, banked vs plain")


def test_energy_reg_and_vater_are_twice_differentiable():
    model, x, y = make("tanh")
    close_grads(_second_order(ater_ext.energy_reg(model, x, y), model),
                _second_order(R.ref_energy_reg(model, x, y), model), 1e-9, "energy_reg second order")
    torch.manual_seed(2)
    a = O.vater_loss(model, x[:6], y[:6], x[6:])[0]
    torch.manual_seed(2)
    b = R.ref_vater_loss(model, x[:6], y[:6], x[6:])
    close_grads(_second_order(a, model), _second_order(b, model), 1e-9, "vater second order")
