"""Contracts checked up front (issue 16, item 3; issue 13, item 8): loss_fn's
``reduction=`` and shapes, ``grad_x`` without ``rng_state`` on a dropout model,
the inputs' memory format kept, ``lam`` / scale ranges, ``grad_x``'s dtype,
inference mode, and a ``TrainStep`` loss returning ``()``."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ater_ext
from ater_ext import attacks, metrics
from ater_ext import objectives as O
from ater_ext import reference as R

from _models import close, close_grads, make, param_grads

F64 = torch.float64


# ----------------------------------------------------------------- loss_fn
def no_reduction_loss(logits, y):
    return F.cross_entropy(logits, y)


def wrong_shape_loss(logits, y, reduction="mean"):
    return F.cross_entropy(logits, y, reduction="none")  # [B] whatever is asked


@pytest.mark.parametrize("call", [
    lambda m, x, y, f: ater_ext.energy_reg(m, x, y, loss_fn=f),
    lambda m, x, y, f: O.ater_loss(m, x, y, loss_fn=f),
    lambda m, x, y, f: attacks.pgd_l2(m, x, y, 0.5, loss_fn=f),
    lambda m, x, y, f: metrics.energy(m, x, y, 0.5, 2, loss_fn=f),
], ids=["energy_reg", "ater_loss", "pgd_l2", "energy"])
def test_loss_fn_contract_is_checked_up_front(call):
    model, x, y = make("tanh")
    with pytest.raises(TypeError, match=r"loss_fn must take reduction= .*no_reduction_loss does not"):
        call(model, x, y, no_reduction_loss)
    with pytest.raises(ValueError, match=r"loss_fn\(logits \[16, 10\], y, reduction='(sum|mean)'\) must return a "
                                         r"floating tensor \[\] \(a scalar\), got a torch.float64 tensor \[16\]"):
        call(model, x, y, wrong_shape_loss)


def test_loss_fn_per_sample_shape_is_checked():
    """A sequence-style loss that keeps a time axis for reduction='none' is refused (per-sample losses are [B])."""
    model, x, y = make("tanh")

    def keeps_an_axis(logits, target, reduction="mean"):
        per = F.cross_entropy(logits, target, reduction="none")
        return per[:, None].expand(-1, 3) if reduction == "none" else getattr(per, reduction)()

    with pytest.raises(ValueError, match=r"ater_loss: loss_fn\(logits \[16, 10\], y, reduction='none'\) must "
                                         r"return a floating tensor \[16\] \(per-sample losses\), got a "
                                         r"torch.float64 tensor \[16, 3\]"):
        O.ater_loss(model, x, y, loss_fn=keeps_an_axis)


def test_nn_loss_module_is_used_with_each_reduction():
    """nn.CrossEntropyLoss(label_smoothing=...) works as loss_fn and equals the functional form."""
    model, x, y = make("bn")
    module = nn.CrossEntropyLoss(label_smoothing=0.1)
    functional = functools.partial(F.cross_entropy, label_smoothing=0.1)
    got = ater_ext.energy_reg(model, x, y, loss_fn=module, reduction="none")
    want = R.ref_energy_reg(model, x, y, loss_fn=functional, reduction="none")
    close(got, want, 1e-9, "energy_reg with an nn loss module")
    torch.manual_seed(1)
    a = O.ater_loss(model, x, y, loss_fn=module)[0]
    torch.manual_seed(1)
    b = O.ater_loss(model, x, y, loss_fn=functional)[0]
    close(a, b, 1e-12, "ater_loss, module vs functional")
    assert module.reduction == "mean"  # the caller's module is not changed


# ------------------------------------------------------- grad_x and dropout
def test_grad_x_without_rng_state_on_dropout_model_raises():
    model, x, y = make("dropout")
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    for fn in (ater_ext.energy_reg, ater_ext.x_max):
        with pytest.raises(ValueError, match=r"grad_x= was given for a model with active dropout but rng_state= "
                                             r"was not.*ater_ext.capture_rng_state\(x.device\)"):
            fn(model, x, y, grad_x=g)
    # explicit fresh masks, or no dropout: accepted
    ater_ext.x_max(model, x, y, grad_x=g, rng_state=ater_ext.capture_rng_state(x.device))
    model.eval()
    ater_ext.x_max(model, x, y, grad_x=g)


# ---------------------------------------------------------- memory format
class FormatSpy(nn.Module):
    """A small CNN that records whether each input it sees is channels_last."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous())
        return self.net(x)


def _cl_batch():
    torch.manual_seed(0)
    model = FormatSpy().double()
    x = torch.rand(6, 3, 6, 6, dtype=F64)
    return model, x, x.contiguous(memory_format=torch.channels_last), torch.randint(0, 5, (6,))


def _is_cl(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_channels_last_in_channels_last_out():
    model, x, xcl, y = _cl_batch()
    for direction in ("fd", "hvp"):
        xm = ater_ext.x_max(model, xcl, y, direction=direction)
        assert _is_cl(xm), direction
        # the conv's summation order differs by format: rounding, amplified by 1 / xi = 1e6 for "fd"
        close(xm, ater_ext.x_max(model, x, y, direction=direction), 1e-7 if direction == "fd" else 1e-11,
              f"x_max {direction}")
    for attack in (attacks.fgsm, attacks.pgd_l2, attacks.pgd_linf):
        adv = attack(model, xcl, y, 0.2, steps=2) if attack is not attacks.fgsm else attack(model, xcl, y, 0.2)
        assert _is_cl(adv), attack.__name__
    # every pass of the objectives (probe, x_adv, x_max) is fed channels_last
    model.seen.clear()
    O.ater_loss(model, xcl, y)[0].backward()
    O.vater_loss(model, xcl[:3], y[:3], xcl[3:])
    ater_ext.energy_reg(model, xcl, y)
    assert len(model.seen) > 8 and all(model.seen), model.seen


# ------------------------------------------------------------ scalar ranges
@pytest.mark.parametrize("lam", [float("nan"), -0.1, float("inf")])
def test_lam_is_validated(lam):
    model, x, y = make("tanh")
    with pytest.raises(ValueError, match=r"ater_loss: lam .* must be finite and >= 0"):
        O.ater_loss(model, x, y, lam=lam)
    with pytest.raises(ValueError, match=r"vater_loss: lam .* must be finite and >= 0"):
        O.vater_loss(model, x[:4], y[:4], x[4:], lam=lam)
    with pytest.raises(ValueError, match=r"ATERLoss: lam"):
        ater_ext.ATERLoss(lam=lam)


@pytest.mark.parametrize("name", ["eps", "xi", "fd_h"])
def test_scales_beyond_the_dtype_range_are_refused(name):
    model, x, y = make("tanh", dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"energy_reg: {name}=1e\+39 is beyond the range of the inputs' dtype "
                                         rf"torch.float32"):
        ater_ext.energy_reg(model, x, y, penalty="fd", **{name: 1e39})
    # the same value in fp64 is in range (and gives a finite result for eps)
    model64, x64, y64 = make("tanh")
    if name == "eps":
        assert torch.isfinite(ater_ext.energy_reg(model64, x64, y64, eps=1e39))


def test_objective_and_attack_scales_beyond_the_dtype_range():
    model, x, y = make("tanh", dtype=torch.float16)
    model = model.float()
    with pytest.raises(ValueError, match="ater_loss: eps_adv=100000 is beyond .* torch.float16"):
        O.ater_loss(model, x, y, eps_adv=1e5)
    with pytest.raises(ValueError, match="pgd_l2: eps=100000 is beyond .* torch.float16"):
        attacks.pgd_l2(model, x, y, 1e5)
    with pytest.raises(ValueError, match="vat_loss: xi_vat=100000 is beyond"):
        O.vat_loss(model, x, xi_vat=1e5)


def test_grad_x_of_another_dtype_names_both():
    model, x, y = make("tanh")
    g = torch.randn_like(x, dtype=torch.float32)
    for fn in ("energy_reg", "x_max"):
        with pytest.raises(ValueError, match=rf"{fn}: grad_x must have x's dtype and device, got grad_x "
                                             rf"torch.float32 on cpu and x torch.float64 on cpu"):
            getattr(ater_ext, fn)(model, x, y, grad_x=g)


def test_inference_mode_gets_a_message_naming_the_lightning_option():
    model, x, y = make("tanh")
    with torch.inference_mode():
        for call in (lambda: attacks.pgd_l2(model, x, y, 0.5), lambda: ater_ext.x_max(model, x, y),
                     lambda: O.ater_loss(model, x, y)):
            with pytest.raises(RuntimeError, match=r"inference_mode\(\).*Trainer\s+with inference_mode=False"):
                call()
        x_inf = x.clone()
    with pytest.raises(RuntimeError, match="x is an inference tensor"):
        attacks.fgsm(model, x_inf, y, 0.1)


@pytest.mark.parametrize("bad", [(), [], (torch.tensor(1.0), {}, 3)])
def test_train_step_loss_returning_an_empty_or_long_tuple(bad):
    model, x, y = make("tanh")
    step = ater_ext.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, a, b: bad)
    with pytest.raises(TypeError, match=rf"TrainStep: loss_fn must return a scalar tensor or \(scalar tensor, "
                                        rf"stats\), got a {type(bad).__name__} of length {len(bad)}"):
        step(x, y)


def test_grad_of_checked_loss_equals_plain_loss():
    """The checked loss wrapper adds nothing to the math."""
    model, x, y = make("bn")
    got = ater_ext.energy_reg(model, x, y, loss_fn=F.cross_entropy, reduction="none")
    want = R.ref_energy_reg(model, x, y, reduction="none")
    close_grads(param_grads(got.sum(), model), param_grads(want.sum(), model), 1e-9, "grads")
