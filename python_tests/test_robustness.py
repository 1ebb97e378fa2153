"""ater_ext.robustness: PGD with restarts and AutoAttack (pyautoattack), checked
against the exact robust accuracy of linear models, where the distance from a
point to the nearest other class is known in closed form."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ater_ext import robustness

D, C, N = 64, 10, 80


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def linear_case(seed: int = 0):
    """A linear classifier and points in [0.3, 0.7]^D (so that the [0, 1] box never binds at the radii used)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(D, C).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(C, D, generator=g, dtype=torch.float64))
        model.bias.zero_()
    x = 0.3 + 0.4 * torch.rand(N, D, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    y[:8] = (y[:8] + 1) % C  # a few misclassified points: never robust
    return model, x, y


def as_image_model(linear: nn.Linear) -> nn.Module:
    """The same linear map on [B, 1, 8, 8] images, in fp32 (AutoAttack works on image batches)."""
    return nn.Sequential(nn.Flatten(), linear.float())


def as_images(x):
    return x.float().reshape(-1, 1, 8, 8)


def exact_robust(model: nn.Linear, x, y, eps: float, norm: str) -> torch.Tensor:
    """Correct and every other class's hyperplane farther than eps (dual norm: L2 -> L2, Linf -> L1)."""
    z = model(x)
    w = model.weight
    correct = z.argmax(1) == y
    margins = z.gather(1, y[:, None]) - z                        # [N, C]
    dw = w[y][:, None, :] - w[None, :, :]                        # [N, C, D]
    dual = dw.norm(dim=2) if norm == "l2" else dw.abs().sum(dim=2)
    dist = torch.where(torch.arange(C)[None, :] == y[:, None], torch.full_like(margins, float("inf")),
                       margins / dual)
    return correct & (dist.min(dim=1).values > eps)


def radius_for(model, x, y, norm):
    """The radius at which about half of the correct points are exactly robust (both outcomes occur)."""
    target = (model(x).argmax(1) == y).double().mean() / 2
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if exact_robust(model, x, y, mid, norm).double().mean() > target else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("norm, attack", [("l2", "pgd-l2"), ("linf", "pgd-linf")])
def test_pgd_reaches_the_exact_robust_accuracy_of_a_linear_model(norm, attack):
    model, x, y = linear_case()
    eps = radius_for(model, x, y, norm)
    exact = exact_robust(model, x, y, eps, norm)
    assert 0 < exact.sum() < (model(x).argmax(1) == y).sum()
    robust = robustness.pgd_robust_mask(model, x, y, attack, eps, steps=100, restarts=2)
    assert (robust | ~exact).all(), "PGD 'broke' a point that no perturbation of that size can break"
    # PGD ascends the cross-entropy, not the margin: it may miss a break close to the radius, no other
    missed = robust & ~exact
    assert missed.sum() <= 3
    assert exact_robust(model, x[missed], y[missed], 0.9 * eps, norm).all(), "PGD missed a break well inside eps"


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_autoattack_equals_the_exact_robust_accuracy_of_a_linear_model(norm):
    linear, x, y = linear_case(1)
    eps = radius_for(linear, x, y, norm)
    exact = exact_robust(linear, x, y, eps, norm)
    model, x = as_image_model(linear), as_images(x)
    result = robustness.autoattack(model, x, y, norm=norm, eps=eps, batch_size=N, progress=False)
    assert torch.equal(result.robust, exact), (result.robust != exact).nonzero()
    assert result.robust_accuracy == pytest.approx(100.0 * exact.sum().item() / N)
    assert [a["attack"] for a in result.per_attack] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    correct = model(x).argmax(1) == y
    assert correct.sum().item() - sum(a["broken"] for a in result.per_attack) == result.robust.sum().item()
    assert result.per_attack[-1]["robust_accuracy"] == result.robust_accuracy
    broken = ~result.robust & correct
    dist = robustness.perturbation_norms(result.x_adv[broken], x[broken], norm)
    assert (dist <= eps * (1 + 1e-5)).all()
    assert (model(result.x_adv[broken]).argmax(1) != y[broken]).all()


def test_restarts_are_a_worst_case_and_reproducible():
    model, x, y = linear_case(2)
    eps = radius_for(model, x, y, "l2")
    one = robustness.pgd_robust_mask(model, x, y, "pgd-l2", eps, steps=3, random_start=True, seed=5)
    again = robustness.pgd_robust_mask(model, x, y, "pgd-l2", eps, steps=3, random_start=True, seed=5)
    many = robustness.pgd_robust_mask(model, x, y, "pgd-l2", eps, steps=3, restarts=4, seed=5)
    assert torch.equal(one, again)
    assert not (many & ~one).any(), "more restarts made a point robust again"
    state = torch.get_rng_state()
    robustness.pgd_robust_mask(model, x, y, "pgd-l2", eps, steps=2, restarts=2)
    # a large radius: every point breaks before Square, whose 5000 queries would dominate the test's time
    robustness.autoattack(as_image_model(model), as_images(x)[:20], y[:20], norm="l2", eps=2.0, progress=False)
    assert torch.equal(state, torch.get_rng_state()), "an evaluation changed the caller's RNG"


def test_model_mode_is_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, C), nn.Dropout(0.5))
    model.train()
    x, y = torch.rand(10, 1, 8, 8), torch.randint(0, C, (10,))
    robustness.attack_accuracy(model, x, y, "pgd-linf", 0.1, steps=2)
    robustness.autoattack(model, x, y, eps=0.5, progress=False)
    assert model.training and model[2].training


class _FirstLogit(nn.Module):
    """Returns [B] instead of [B, classes]."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)[:, 0]


@pytest.mark.parametrize("call, match", [
    (lambda m, x, y: robustness.attack_accuracy(m, x, y, "cw", 0.1), "unknown attack 'cw'"),
    (lambda m, x, y: robustness.autoattack(m, x, y, norm="l1", eps=0.1), "norm must be one of"),
    (lambda m, x, y: robustness.autoattack(m, x, y, eps=0.0), "eps must be finite and > 0"),
    (lambda m, x, y: robustness.autoattack(m, x, y, eps=float("nan")), "eps must be finite and > 0"),
    (lambda m, x, y: robustness.autoattack(m, x * 255, y, eps=0.1), r"outside the data range \[0, 1\]"),
    (lambda m, x, y: robustness.autoattack(_FirstLogit(m), x, y, eps=0.1), r"\[B, classes\]"),
    (lambda m, x, y: robustness.pgd_robust_mask(m, x, y, "pgd-l2", 0.1, restarts=0), "restarts must be"),
    (lambda m, x, y: robustness.autoattack(m[1], x.flatten(1), y, eps=0.1), r"\[B, C, H, W\]"),
])
def test_bad_input_is_named(call, match):
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, C))
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, C, (6,))
    with pytest.raises(ValueError, match=match):
        call(model, x, y)


def test_collect_from_a_loader():
    x, y = torch.rand(25, D), torch.randint(0, C, (25,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    cx, cy = robustness.collect(loader, limit=15)
    assert torch.equal(cx, x[:15]) and torch.equal(cy, y[:15])
    assert torch.equal(robustness.collect((x, y))[0], x)
