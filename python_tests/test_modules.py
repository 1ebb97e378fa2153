"""Module forms (issue 16, item 1): each equals its function with the same
settings, checks its settings at construction, and shows them in ``repr``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ater_ext
from ater_ext import objectives as O

from _models import close, close_grads, make, param_grads


def _same(module_call, function_call, model, what):
    torch.manual_seed(5)
    a = module_call()
    torch.manual_seed(5)
    b = function_call()
    close(a, b, 1e-12, what)
    close_grads(param_grads(a, model), param_grads(b, model), 1e-12, f"{what} grads")


@pytest.mark.parametrize("kind", ["bn", "dropout"])
def test_modules_equal_their_functions(kind):
    model, x, y = make(kind)
    reg = ater_ext.EnergyReg(eps=1.5, xi=1e-5, penalty="fd", fd_h=1e-3)
    _same(lambda: reg(model, x, y),
          lambda: ater_ext.energy_reg(model, x, y, eps=1.5, xi=1e-5, penalty="fd", fd_h=1e-3), model, "EnergyReg")
    _same(lambda: ater_ext.ERMLoss()(model, x, y), lambda: O.erm_loss(model, x, y)[0], model, "ERMLoss")
    _same(lambda: ater_ext.ATLoss(1.0)(model, x, y), lambda: O.at_loss(model, x, y, eps_adv=1.0)[0], model, "ATLoss")
    _same(lambda: ater_ext.VATLoss(1e-5, 1.0, 2)(model, x),
          lambda: O.vat_loss(model, x, xi_vat=1e-5, eps_vat=1.0, ip=2)[0], model, "VATLoss(xi, eps, ip)")
    crit = ater_ext.ATERLoss(1.0, 1.5, 0.5, xi=1e-5)
    _same(lambda: crit(model, x, y), lambda: O.ater_loss(model, x, y, eps_adv=1.0, eps=1.5, lam=0.5, xi=1e-5)[0],
          model, "ATERLoss")
    assert sorted(crit.last_stats) == ["adv", "ce", "energy", "loss", "xmax_grad_ratio"]
    _same(lambda: ater_ext.VATERLoss(lam=0.3)(model, x[:6], y[:6], x[6:]),
          lambda: O.vater_loss(model, x[:6], y[:6], x[6:], lam=0.3)[0], model, "VATERLoss")


def test_module_per_call_arguments():
    model, x, y = make("dropout")
    state = ater_ext.capture_rng_state(x.device)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    reg = ater_ext.EnergyReg(eps=1.0)
    close(reg(model, x, y, grad_x=g, rng_state=state),
          ater_ext.energy_reg(model, x, y, eps=1.0, grad_x=g, rng_state=state), 1e-12, "grad_x, rng_state")


def test_repr_shows_the_settings():
    assert repr(ater_ext.VATLoss(1e-6, 2.5, 2)) == "VATLoss(xi=1e-06, eps=2.5, ip=2)"
    text = repr(ater_ext.ATERLoss(eps_adv=1.0, lam=0.5, output="logits"))
    for part in ("ATERLoss(", "eps_adv=1.0", "eps=2.0", "lam=0.5", "xi=None", "output='logits'"):
        assert part in text, text
    assert "penalty='fd'" in repr(ater_ext.EnergyReg(penalty="fd"))


@pytest.mark.parametrize("make_module,match", [
    (lambda: ater_ext.EnergyReg(eps=-1), "EnergyReg: eps must be finite and > 0"),
    (lambda: ater_ext.EnergyReg(direction="exact"), "EnergyReg: direction must be one of"),
    (lambda: ater_ext.EnergyReg(compile="fast"), "compile must be a bool or one of"),
    (lambda: ater_ext.ATERLoss(lam=float("nan")), "ATERLoss: lam"),
    (lambda: ater_ext.ATERLoss(xi=0), "ATERLoss: xi must be finite and > 0"),
    (lambda: ater_ext.VATLoss(ip=0), "VATLoss: ip"),
    (lambda: ater_ext.VATERLoss(eps_vat=float("inf")), "VATERLoss: eps_vat"),
    (lambda: ater_ext.ATLoss(output=2.5), "ATLoss: output must be None"),
    (lambda: ater_ext.ERMLoss(loss_fn=lambda logits, y: logits.sum()), "ERMLoss: loss_fn must take reduction="),
])
def test_settings_are_checked_at_construction(make_module, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_module()


def test_train_step_reports_a_module_s_stats():
    model, x, y = make("bn")
    step = ater_ext.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), ater_ext.ATERLoss(lam=0.1))
    loss = step(x, y)
    assert sorted(step.last_stats) == ["adv", "ce", "energy", "loss", "xmax_grad_ratio"]
    assert step.last_stats["loss"] == pytest.approx(float(loss))
