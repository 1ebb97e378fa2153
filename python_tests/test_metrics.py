"""ater_ext.metrics.energy against closed forms.

With the identity model the loss is a function of the perturbed point ``x'``
itself, so the Monte-Carlo estimates have exact expectations:

* ``L = ||x'||^2 / 2``: ``grad = x'``, ``||grad|| = r`` (the distance to ``x = 0``).
  For ``x'`` uniform in the D-ball of radius eps, ``r = eps * U^(1/D)``, so
  ``E[r] = eps * D / (D + 1)`` and ``Var[r] = eps^2 * (D / (D + 2) - (D / (D + 1))^2)``;
  along a ray ``r ~ U[0, eps]``, so ``E_eps = eps * E[r] = eps^2 / 2``,
  ``Var[eps * r] = eps^4 / 12``.
* ``L = ||x'||^3 / 3``: ``||grad|| = r^2``, ``E[r^2] = eps^2 * D / (D + 2)`` (ball),
  ``E_eps = eps * eps^2 / 3`` (ray): checks the radius law, not just its mean.
* ``L = <w, x'>``: ``||grad|| = ||w||`` everywhere, so both estimates are exact.

Tolerances are ``Z`` standard errors of the estimate (sample std / sqrt(draws)),
with ``Z = 5``: a correct implementation fails with probability ~1e-6 per check,
while a wrong radius law (e.g. ``eps * U`` in the ball, mean ``eps / 2``) is off
by dozens of standard errors.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _models
from _ops_common import DEVICES
from ater_ext import metrics

Z = 5.0


def half_square(logits, y, reduction="mean"):
    per = 0.5 * logits.flatten(1).pow(2).sum(dim=1)
    return per.sum() if reduction == "sum" else per.mean() if reduction == "mean" else per


def third_cube(logits, y, reduction="mean"):
    per = logits.flatten(1).norm(dim=1).pow(3) / 3
    return per.sum() if reduction == "sum" else per.mean() if reduction == "mean" else per


def zeros_batch(shape, device="cpu"):
    x = torch.zeros(shape, dtype=torch.float64, device=device)
    return x, torch.zeros(shape[0], dtype=torch.long, device=device)


def assert_within(value, expected, std, draws, what):
    tol = Z * std / math.sqrt(draws)
    err = abs(float(value) - expected)
    assert err <= tol, f"{what}: {float(value):.6g} vs {expected:.6g}, |err| {err:.3g} > {Z} SE = {tol:.3g}"


# ------------------------------------------------------------ closed forms
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(64, 10), (64, 1, 3, 3)], ids=["flat", "image"])
def test_quadratic_loss_closed_forms(shape, device):
    eps, n = 0.7, 128
    x, y = zeros_batch(shape, device)
    dim = math.prod(shape[1:])
    out = metrics.energy(nn.Identity(), x, y, eps, n, loss_fn=half_square,
                         generator=torch.Generator(device=device).manual_seed(1))
    draws = shape[0] * n
    std_ball = eps * math.sqrt(dim / (dim + 2) - (dim / (dim + 1)) ** 2)
    assert_within(out["E_B"], eps * dim / (dim + 1), std_ball, draws, "E_B/Vol")
    assert_within(out["E_eps"], eps ** 2 / 2, eps ** 2 / math.sqrt(12), draws, "E_eps")
    assert out["E_B"].dim() == 0 and out["E_B"].dtype == torch.float64


def test_cubic_loss_checks_the_radius_law():
    eps, n, dim = 1.3, 128, 6
    x, y = zeros_batch((64, dim))
    out = metrics.energy(nn.Identity(), x, y, eps, n, loss_fn=third_cube, generator=torch.Generator().manual_seed(2))
    draws = 64 * n
    # r^2 for r = eps U^(1/D): E = eps^2 D/(D+2), E[r^4] = eps^4 D/(D+4).
    m1, m2 = eps ** 2 * dim / (dim + 2), eps ** 4 * dim / (dim + 4)
    assert_within(out["E_B"], m1, math.sqrt(m2 - m1 ** 2), draws, "E_B/Vol")
    # eps * r^2 for r ~ U[0, eps]: E = eps^3/3, E[(eps r^2)^2] = eps^6/5.
    assert_within(out["E_eps"], eps ** 3 / 3, math.sqrt(eps ** 6 / 5 - eps ** 6 / 9), draws, "E_eps")


def test_per_sample_estimates_match_closed_forms():
    eps, n, dim = 0.5, 256, 10
    x, y = zeros_batch((16, dim))
    out = metrics.energy(nn.Identity(), x, y, eps, n, loss_fn=half_square, reduction="none",
                         generator=torch.Generator().manual_seed(3))
    assert out["E_B"].shape == (16,) and out["E_eps"].shape == (16,)
    std_ball = eps * math.sqrt(dim / (dim + 2) - (dim / (dim + 1)) ** 2)
    for i in range(16):
        assert_within(out["E_B"][i], eps * dim / (dim + 1), std_ball, n, f"E_B/Vol sample {i}")
        assert_within(out["E_eps"][i], eps ** 2 / 2, eps ** 2 / math.sqrt(12), n, f"E_eps sample {i}")
    # Every draw lies in the ball: ||grad|| = r <= eps, so no per-sample mean can exceed it.
    assert bool((out["E_B"] <= eps).all()) and bool((out["E_eps"] <= eps ** 2).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_constant_gradient_is_exact(dtype, device):
    """L = <w, x'> per sample: ||grad|| = ||w|| at every point, whatever the draws."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    x = torch.randn(5, 2, 3, 4, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.zeros(5, dtype=torch.long, device=device)

    def linear_loss(logits, target, reduction="mean"):
        per = (logits * w).flatten(1).sum(dim=1)
        return per.sum() if reduction == "sum" else per.mean() if reduction == "mean" else per

    eps = 0.8
    out = metrics.energy(nn.Identity(), x, y, eps, 4, loss_fn=linear_loss, reduction="none")
    w_norm = w.double().norm().item()
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out["E_B"].dtype == acc
    torch.testing.assert_close(out["E_B"].double().cpu(), torch.full((5,), w_norm, dtype=torch.float64),
                               rtol=rtol, atol=0)
    torch.testing.assert_close(out["E_eps"].double().cpu(), torch.full((5,), eps * w_norm, dtype=torch.float64),
                               rtol=rtol, atol=0)


def test_per_sample_gradients_do_not_mix():
    """Samples with different gradient sizes keep their own norms (grad of the
    summed loss w.r.t. the batch is per sample): row i has ||grad|| = |c_i| * ||w||."""
    c = torch.tensor([0.0, 1.0, 2.5, -4.0], dtype=torch.float64)
    w = torch.tensor([3.0, 4.0], dtype=torch.float64)  # ||w|| = 5

    def scaled_linear(logits, target, reduction="mean"):
        per = c * (logits @ w)
        return per.sum() if reduction == "sum" else per.mean() if reduction == "mean" else per

    x, y = torch.randn(4, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    out = metrics.energy(nn.Identity(), x, y, 0.3, 3, loss_fn=scaled_linear, reduction="none")
    torch.testing.assert_close(out["E_B"], 5 * c.abs(), rtol=1e-13, atol=0)
    torch.testing.assert_close(out["E_eps"], 0.3 * 5 * c.abs(), rtol=1e-13, atol=0)


def test_reductions_agree():
    model, x, y = _models.make("tanh", batch=8, train=False)
    kw = dict(eps=0.5, n_samples=4)
    none = metrics.energy(model, x, y, generator=torch.Generator().manual_seed(5), reduction="none", **kw)
    mean = metrics.energy(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    total = metrics.energy(model, x, y, generator=torch.Generator().manual_seed(5), reduction="sum", **kw)
    for k in ("E_B", "E_eps"):
        torch.testing.assert_close(mean[k], none[k].mean(), rtol=1e-14, atol=0)
        torch.testing.assert_close(total[k], none[k].sum(), rtol=1e-14, atol=0)
        assert bool((none[k] > 0).all())


def test_cross_entropy_against_a_direct_estimate():
    """The default loss (cross-entropy) on an MLP: the estimate stays within a
    few standard errors of an independent Monte-Carlo run written here with
    plain autograd (its own draws, one sample at a time)."""
    model, x, y = _models.make("tanh", batch=4, train=False)
    eps, n = 1.0, 100
    out = metrics.energy(model, x, y, eps, n, reduction="none", generator=torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(7)
    dim = x[0].numel()
    for i in range(x.shape[0]):
        norms = []
        for power in (1 / dim, 1.0):  # ball: r = eps U^(1/D); ray: r = eps U
            d = torch.randn(n, dim, generator=gen, dtype=torch.float64)
            r = eps * torch.rand(n, 1, generator=gen, dtype=torch.float64) ** power
            pts = (x[i] + r * d / d.norm(dim=1, keepdim=True)).requires_grad_(True)
            loss = F.cross_entropy(model(pts), y[i].expand(n), reduction="sum")
            (g,) = torch.autograd.grad(loss, pts)
            norms.append(g.norm(dim=1))
        b, r = norms[0], eps * norms[1]
        # Two independent estimates: the difference has variance (sd^2 / n) * 2.
        assert_within(out["E_B"][i] - b.mean(), 0.0, b.std().item() * math.sqrt(2), n, f"E_B sample {i}")
        assert_within(out["E_eps"][i] - r.mean(), 0.0, r.std().item() * math.sqrt(2), n, f"E_eps sample {i}")


# ------------------------------------------------------------ reproducibility
def test_seeded():
    model, x, y = _models.make("tanh", batch=6, train=False)
    a = metrics.energy(model, x, y, 0.5, 3, generator=torch.Generator().manual_seed(8))
    b = metrics.energy(model, x, y, 0.5, 3, generator=torch.Generator().manual_seed(8))
    c = metrics.energy(model, x, y, 0.5, 3, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["E_B"], c["E_B"])
    torch.manual_seed(10)
    d = metrics.energy(model, x, y, 0.5, 3)
    torch.manual_seed(10)
    e = metrics.energy(model, x, y, 0.5, 3)
    assert all(torch.equal(d[k], e[k]) for k in d)
    f = metrics.energy(model, x, y, 0.5, 3)  # the global RNG advanced: new draws
    assert not torch.equal(d["E_B"], f["E_B"])


def test_draws_are_not_replayed():
    """The passes replay one RNG state (for dropout masks); the draws must not be
    replayed with it. With ||grad|| = r, n identical draws would make the mean
    of 8 draws equal to the first draw alone."""
    x, y = zeros_batch((4, 5))
    torch.manual_seed(0)
    one = metrics.energy(nn.Identity(), x, y, 1.0, 1, loss_fn=half_square, reduction="none")
    torch.manual_seed(0)
    eight = metrics.energy(nn.Identity(), x, y, 1.0, 8, loss_fn=half_square, reduction="none")
    assert not torch.equal(one["E_B"], eight["E_B"]) and not torch.equal(one["E_eps"], eight["E_eps"])


# ---------------------------------------------------------------- hygiene
@pytest.mark.parametrize("eval_mode", [True, False])
def test_mode_buffers_and_grads_untouched(eval_mode):
    model, x, y = _models.make("bn", batch=16, train=True)
    model[1].eval()
    flags = [m.training for m in model.modules()]
    before = _models.buffers(model)
    with torch.no_grad():
        out = metrics.energy(model, x, y, 0.5, 2, eval_mode=eval_mode)
    assert all(torch.isfinite(v) for v in out.values())
    assert [m.training for m in model.modules()] == flags
    _models.assert_buffers_equal(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_uses_running_statistics():
    model, x, y = _models.make("bn", batch=16, train=True)
    as_train = metrics.energy(model, x, y, 0.5, 2, generator=torch.Generator().manual_seed(11))
    model.eval()
    as_eval = metrics.energy(model, x, y, 0.5, 2, eval_mode=False, generator=torch.Generator().manual_seed(11))
    assert all(torch.equal(as_train[k], as_eval[k]) for k in as_train)


def test_exception_restores_mode():
    model, x, y = _models.make("bn", batch=8, train=True)

    def broken(logits, target, reduction="mean"):
        raise RuntimeError("boom in energy loss")

    with pytest.raises(RuntimeError, match="boom in energy loss"):
        metrics.energy(model, x, y, 0.5, 2, loss_fn=broken)
    assert all(m.training for m in model.modules())


def test_fp32_result_dtype():
    model, x, y = _models.make("tanh", batch=4, dtype=torch.float32, train=False)
    out = metrics.energy(model, x, y, 0.5, 2)
    assert out["E_B"].dtype == torch.float32 and out["E_eps"].dtype == torch.float32


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, what", [
    (dict(eps=0.0), "eps"), (dict(eps=-1.0), "eps"), (dict(eps=float("nan")), "eps"),
    (dict(eps=float("inf")), "eps"), (dict(n_samples=0), "n_samples"), (dict(n_samples=2.5), "n_samples"),
    (dict(reduction="max"), "reduction"),
])
def test_bad_arguments_name_energy(kwargs, what):
    model, x, y = _models.make("tanh", batch=4, train=False)
    args = dict(eps=0.5, n_samples=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"energy: {what}"):
        metrics.energy(model, x, y, **args)


def test_batch_mismatch_names_energy_and_shapes():
    model, x, y = _models.make("tanh", batch=4, train=False)
    with pytest.raises(ValueError, match=r"energy.*\[4, 20\].*\[5\]"):
        metrics.energy(model, x, torch.zeros(5, dtype=torch.long), 0.5)
