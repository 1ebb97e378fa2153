"""ater_ext.attacks: FGSM, PGD-L2 and PGD-Linf against closed forms and
independent autograd computations, plus the model hygiene they promise
(mode restored, buffers and .grad untouched, no_grad-safe, zero gradients)."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _models
from _ops_common import DEVICES
from ater_ext import attacks

ATTACKS = [pytest.param(attacks.fgsm, id="fgsm"), pytest.param(attacks.pgd_l2, id="pgd_l2"),
           pytest.param(attacks.pgd_linf, id="pgd_linf")]
PGD = [pytest.param(attacks.pgd_l2, id="pgd_l2"), pytest.param(attacks.pgd_linf, id="pgd_linf")]


# ---------------------------------------------------------------- helpers
def linear_two_class(device="cpu", dim=7, batch=6, seed=0):
    """logits = W x + b with 2 classes: the CE loss only grows along
    d_i = w_other - w_{y_i}, everywhere, so the worst perturbations are known:
    eps * d / ||d|| (L2) and eps * sign(d) (L-inf)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(dim, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, dim, generator=gen, dtype=torch.float64))
        model.bias.copy_(0.1 * torch.randn(2, generator=gen, dtype=torch.float64))
    x = 0.3 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (batch,), generator=gen)
    w = model.weight.detach()
    d = w[1 - y] - w[y]  # [B, D]
    return model.to(device), x.to(device), y.to(device), d.to(device)


def trained_mlp(dtype=torch.float64, seed=0):
    """A small ReLU MLP fitted a little on three Gaussian blobs inside [0, 1]^D:
    most points are classified correctly with margin, as for a real model.
    Trained once per seed; every call gets its own copy."""
    model, x, y = _trained_mlp(seed)
    return copy.deepcopy(model).to(dtype), x.to(dtype), y.clone()


@functools.lru_cache(maxsize=None)
def _trained_mlp(seed):
    gen = torch.Generator().manual_seed(seed)
    dim, n = 12, 64
    y = torch.randint(0, 3, (n,), generator=gen)
    centres = 0.2 + 0.6 * torch.rand(3, dim, generator=gen, dtype=torch.float64)
    x = (centres[y] + 0.08 * torch.randn(n, dim, generator=gen, dtype=torch.float64)).clamp(0, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, x, y


def per_sample_loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def unit_rows(v):
    return v / v.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (v.dim() - 1))


# ------------------------------------------------------- closed forms (linear)
@pytest.mark.parametrize("device", DEVICES)
def test_pgd_l2_finds_the_linear_optimum(device):
    model, x, y, d = linear_two_class(device)
    eps = 0.5
    x_adv = attacks.pgd_l2(model, x, y, eps, clamp=None)
    torch.testing.assert_close(x_adv, x + eps * unit_rows(d), rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_fgsm_is_the_sign_of_the_linear_direction(device):
    model, x, y, d = linear_two_class(device)
    eps = 0.25
    x_adv = attacks.fgsm(model, x, y, eps, clamp=None)
    torch.testing.assert_close(x_adv, x + eps * d.sign(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_pgd_linf_reaches_the_optimal_corner(device):
    model, x, y, d = linear_two_class(device)
    eps = 0.25
    x_adv = attacks.pgd_linf(model, x, y, eps, clamp=None)  # default: 10 steps of 2.5 eps / 10
    torch.testing.assert_close(x_adv, x + eps * d.sign(), rtol=0, atol=1e-15)
    # Fewer steps than needed to reach the corner: exactly steps * step_size along sign(d).
    x_part = attacks.pgd_linf(model, x, y, eps, steps=2, step_size=0.05, clamp=None)
    torch.testing.assert_close(x_part, x + 0.1 * d.sign(), rtol=0, atol=1e-15)


def test_pgd_l2_partial_steps_move_along_the_gradient():
    """Two steps of 0.1 in a ball of radius 1: no projection, 0.2 along d."""
    model, x, y, d = linear_two_class()
    x_adv = attacks.pgd_l2(model, x, y, 1.0, steps=2, step_size=0.1, clamp=None)
    torch.testing.assert_close(x_adv, x + 0.2 * unit_rows(d), rtol=0, atol=1e-14)


# --------------------------------------------------- attacks against each other
@pytest.mark.parametrize("kind", ["tanh", "cnn"])
def test_one_step_pgd_l2_is_the_normalised_gradient_step(kind):
    """pgd_l2(steps=1, step_size=eps) == x + eps * g / ||g||, g from plain autograd."""
    model, x, y = _models.make(kind, batch=8, train=False)
    eps = 0.7
    xl = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xl), y, reduction="sum"), xl)
    expected = x + eps * unit_rows(g)
    got = attacks.pgd_l2(model, x, y, eps, steps=1, step_size=eps, clamp=None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("clamp", [None, (-1.0, 1.0)])
def test_one_step_pgd_linf_is_fgsm(clamp):
    model, x, y = _models.make("relu", batch=8, train=False)
    x = x.clamp(-1, 1)
    eps = 0.3
    got = attacks.pgd_linf(model, x, y, eps, steps=1, step_size=eps, clamp=clamp)
    torch.testing.assert_close(got, attacks.fgsm(model, x, y, eps, clamp=clamp), rtol=0, atol=0)


def test_fgsm_matches_autograd_sign():
    model, x, y = _models.make("tanh", batch=8, train=False)
    xl = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xl), y), xl)
    torch.testing.assert_close(attacks.fgsm(model, x, y, 0.1, clamp=None), x + 0.1 * g.sign(), rtol=0, atol=0)


# ------------------------------------------------------------ attack quality
@pytest.mark.parametrize("attack", ATTACKS)
def test_loss_never_lower_than_clean(attack):
    model, x, y = trained_mlp()
    clean = per_sample_loss(model, x, y)
    for eps in (0.02, 0.1, 0.3):
        adv = per_sample_loss(model, attack(model, x, y, eps), y)
        assert bool((adv >= clean - 1e-12).all()), f"eps {eps}: {int((adv < clean).sum())} samples lost loss"
        assert adv.mean() > clean.mean()


def test_pgd_beats_or_matches_its_first_step():
    """More steps of projected ascent: mean loss at least that of one step."""
    model, x, y = trained_mlp()
    eps = 0.3
    one = per_sample_loss(model, attacks.pgd_l2(model, x, y, eps, steps=1, step_size=eps), y)
    many = per_sample_loss(model, attacks.pgd_l2(model, x, y, eps, steps=20), y)
    assert many.mean() >= one.mean()
    one = per_sample_loss(model, attacks.fgsm(model, x, y, eps), y)
    many = per_sample_loss(model, attacks.pgd_linf(model, x, y, eps, steps=20), y)
    assert many.mean() >= one.mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("random_start", [False, True], ids=["x0", "random"])
@pytest.mark.parametrize("eps", [0.05, 3.0])
def test_constraints_hold(dtype, random_start, eps):
    model, x, y = trained_mlp(dtype)
    tol = 1e-6
    for attack in (attacks.pgd_l2, attacks.pgd_linf):
        x_adv = attack(model, x, y, eps, steps=5, random_start=random_start)
        delta = (x_adv - x).double()
        if attack is attacks.pgd_l2:
            assert delta.flatten(1).norm(dim=1).max() <= eps + tol
        else:
            assert delta.abs().max() <= eps + tol
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert x_adv.dtype == dtype and not torch.isnan(x_adv).any()
    x_adv = attacks.fgsm(model, x, y, eps)
    assert (x_adv - x).abs().max() <= eps + tol and x_adv.min() >= 0 and x_adv.max() <= 1


def test_clamp_range_is_honoured():
    model, x, y = trained_mlp()
    x = 0.25 + 0.5 * x  # inside (0.25, 0.75)
    for attack in (attacks.fgsm, attacks.pgd_l2, attacks.pgd_linf):
        x_adv = attack(model, x, y, 1.0, clamp=(0.25, 0.75))
        assert x_adv.min() >= 0.25 and x_adv.max() <= 0.75


def test_random_start_is_seeded_and_in_the_ball():
    model, x, y = trained_mlp()
    for attack in PGD:
        attack = attack.values[0]
        a = attack(model, x, y, 0.3, steps=1, random_start=True, generator=torch.Generator().manual_seed(3))
        b = attack(model, x, y, 0.3, steps=1, random_start=True, generator=torch.Generator().manual_seed(3))
        c = attack(model, x, y, 0.3, steps=1, random_start=False)
        assert torch.equal(a, b) and not torch.equal(a, c)
        torch.manual_seed(5)
        d = attack(model, x, y, 0.3, steps=1, random_start=True)
        torch.manual_seed(5)
        assert torch.equal(d, attack(model, x, y, 0.3, steps=1, random_start=True))


# --------------------------------------------------------------- hygiene
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attack", ATTACKS)
def test_mode_buffers_and_grads_untouched(attack, device):
    model, x, y = _models.make("bn", batch=16, train=True)
    model, x, y = model.to(device), x.to(device), y.to(device)
    model[4].eval()  # a mixed-mode model: each flag must come back as it was
    flags = [m.training for m in model.modules()]
    before = _models.buffers(model)
    attack(model, x, y, 0.5, clamp=None)
    assert [m.training for m in model.modules()] == flags
    _models.assert_buffers_equal(model, before)
    assert all(p.grad is None for p in model.parameters())
    # Existing gradients are kept as they are.
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    attack(model, x, y, 0.5, clamp=None, eval_mode=False)
    assert [m.training for m in model.modules()] == flags
    _models.assert_buffers_equal(model, before)  # batch statistics used, running ones not written
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())


@pytest.mark.parametrize("attack", ATTACKS)
def test_eval_mode_flag_selects_the_statistics(attack):
    """eval_mode=True on a train-mode model == the same model put in eval mode;
    eval_mode=False uses the batch statistics (a different attack)."""
    model, x, y = _models.make("bn", batch=16, train=True)
    as_train_eval = attack(model, x, y, 0.5, clamp=None)
    as_train_batchstats = attack(model, x, y, 0.5, clamp=None, eval_mode=False)
    model.eval()
    as_eval = attack(model, x, y, 0.5, clamp=None, eval_mode=False)
    assert not model.training
    torch.testing.assert_close(as_train_eval, as_eval, rtol=0, atol=0)
    assert not torch.equal(as_train_eval, as_train_batchstats)


@pytest.mark.parametrize("attack", ATTACKS)
def test_works_under_no_grad_and_detaches(attack):
    model, x, y = _models.make("tanh", batch=8, dtype=torch.float32, train=False)
    expected = attack(model, x, y, 0.2, clamp=None)
    with torch.no_grad():
        got = attack(model, x, y, 0.2, clamp=None)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    xr = x.clone().requires_grad_(True)
    out = attack(model, xr, y, 0.2, clamp=None)
    assert not out.requires_grad and out.dtype == torch.float32 and xr.grad is None
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("attack", ATTACKS)
def test_exception_in_loss_restores_mode(attack):
    model, x, y = _models.make("bn", batch=8, train=True)
    before = _models.buffers(model)

    def broken_loss(logits, target, reduction="mean"):
        assert not model.training  # the attack runs in eval mode
        raise RuntimeError("boom inside loss_fn")

    with pytest.raises(RuntimeError, match="boom inside loss_fn"):
        attack(model, x, y, 0.5, clamp=None, loss_fn=broken_loss)
    assert all(m.training for m in model.modules())
    _models.assert_buffers_equal(model, before)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("clamp", [None, (-10.0, 10.0)])
def test_zero_gradient_moves_nothing(attack, clamp):
    model, x, y = _models.make("zero", batch=8, train=False)
    x_adv = attack(model, x, y, 0.5, clamp=clamp)
    assert not torch.isnan(x_adv).any()
    torch.testing.assert_close(x_adv, x, rtol=0, atol=0)


def test_zero_gradient_rows_stay_while_others_move():
    """A per-sample loss that is flat for some rows: those rows stay, others move."""
    model, x, y = _models.make("tanh", batch=6, train=False)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], dtype=x.dtype)

    def masked_loss(logits, target, reduction="mean"):
        per = F.cross_entropy(logits, target, reduction="none") * mask
        return per.sum() if reduction == "sum" else per.mean() if reduction == "mean" else per

    for attack in ATTACKS:
        x_adv = attack.values[0](model, x, y, 0.5, clamp=None, loss_fn=masked_loss)
        moved = (x_adv - x).abs().flatten(1).amax(dim=1) > 0
        assert moved.tolist() == [True, False, True, False, True, False]
        assert not torch.isnan(x_adv).any()


@pytest.mark.parametrize("attack", ATTACKS)
def test_eps_zero_returns_a_copy(attack):
    model, x, y = _models.make("tanh", batch=4, train=False)
    out = attack(model, x, y, 0.0, clamp=None)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("attack", ATTACKS)
def test_empty_batch(attack):
    model, x, y = _models.make("tanh", batch=0, train=False)
    out = attack(model, x, y, 0.5, clamp=None)
    assert out.shape == x.shape


def test_data_parallel_wrapper_is_transparent():
    model, x, y = _models.make("tanh", batch=8, train=False)
    wrapped = nn.DataParallel(model) if not torch.cuda.is_available() else model
    for attack in ATTACKS:
        attack = attack.values[0]
        torch.testing.assert_close(attack(wrapped, x, y, 0.3, clamp=None), attack(model, x, y, 0.3, clamp=None),
                                   rtol=0, atol=0)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
def test_bad_eps_names_the_attack(attack, eps):
    model, x, y = _models.make("tanh", batch=4, train=False)
    with pytest.raises(ValueError, match=rf"{attack.__name__}: eps .*{eps}"):
        attack(model, x, y, eps)


@pytest.mark.parametrize("attack", ATTACKS)
def test_batch_mismatch_names_the_shapes(attack):
    model, x, y = _models.make("tanh", batch=4, train=False)
    with pytest.raises(ValueError, match=rf"{attack.__name__}.*\[4, 20\].*\[3\]"):
        attack(model, x, y[:3], 0.1)


@pytest.mark.parametrize("attack", PGD)
def test_bad_steps_and_step_size(attack):
    model, x, y = _models.make("tanh", batch=4, train=False)
    name = attack.__name__
    with pytest.raises(ValueError, match=rf"{name}: steps"):
        attack(model, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match=rf"{name}: step_size"):
        attack(model, x, y, 0.1, step_size=-1.0)
    with pytest.raises(ValueError, match=rf"{name}: clamp"):
        attack(model, x, y, 0.1, clamp=(1.0, 0.0))
