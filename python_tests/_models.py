"""Tiny seeded models and data for the energy and objective tests.

Inputs are ~N(0, 1) so that the probe distance ``xi`` is measured against
values of order one, as it is for standardised image data.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

N_IN = 20  # MLP input features
N_CLASSES = 10
IMG = (1, 8, 8)  # CNN input [C, H, W]

MODEL_KINDS = ("tanh", "relu", "cnn", "bn", "dropout")


def tanh_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(N_IN, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, N_CLASSES))


def relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(N_IN, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, N_CLASSES))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, N_CLASSES),
    )


def bn_mlp() -> nn.Module:
    """The paper's MNIST MLP in miniature: Linear -> BatchNorm1d -> ReLU."""
    return nn.Sequential(
        nn.Linear(N_IN, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, N_CLASSES),
    )


def dropout_mlp(p: float = 0.3) -> nn.Module:
    return nn.Sequential(nn.Linear(N_IN, 32), nn.Tanh(), nn.Dropout(p), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, N_CLASSES))


def zero_grad_mlp() -> nn.Module:
    """Output identically zero (last layer zeroed): every input gradient is exactly 0."""
    m = tanh_mlp()
    with torch.no_grad():
        m[-1].weight.zero_()
        m[-1].bias.zero_()
    return m


_MAKERS = {"tanh": tanh_mlp, "relu": relu_mlp, "cnn": small_cnn, "bn": bn_mlp, "dropout": dropout_mlp,
           "zero": zero_grad_mlp}


def input_shape(kind: str, batch: int) -> Tuple[int, ...]:
    return (batch,) + (IMG if kind == "cnn" else (N_IN,))


def make(kind: str, batch: int = 16, dtype: torch.dtype = torch.float64, seed: int = 0, *, train: bool = True):
    """(model, x, y): a seeded model of ``kind`` in ``dtype``, inputs ~N(0,1), random labels."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MAKERS[kind]().to(dtype)
    model.train(train)
    x = torch.randn(input_shape(kind, batch), generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, N_CLASSES, (batch,), generator=gen)
    return model, x, y


def params(model: nn.Module):
    return [p for p in model.parameters() if p.requires_grad]


def param_grads(loss: torch.Tensor, model: nn.Module):
    """d loss / d parameters (out of place: ``.grad`` stays untouched)."""
    return torch.autograd.grad(loss, params(model), allow_unused=True)


def buffers(model: nn.Module):
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def assert_buffers_equal(model: nn.Module, expected: dict) -> None:
    got = dict(model.named_buffers())
    assert got.keys() == expected.keys()
    for n, b in expected.items():
        assert torch.equal(got[n], b), f"buffer {n} changed: {got[n]} vs {b}"


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str = "") -> None:
    """``|a - b| <= rtol * max|b|`` elementwise: relative to the tensor's scale,
    so entries that happen to be near zero do not need an impossible ulp match."""
    a = a.detach().double()
    b = b.detach().double()
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert err <= rtol * max(scale, 1e-300), f"{what}: max|a-b| = {err:.3e} > {rtol:g} * max|b| = {rtol * scale:.3e}"


def close_grads(ga, gb, rtol: float, what: str = "") -> None:
    """Parameter gradients equal to ``rtol`` relative to the largest entry of
    the whole gradient (``gb``), so a parameter whose exact gradient is 0 (a
    bias before BatchNorm) is compared at the model's scale, not its own."""
    assert len(ga) == len(gb)
    scale = max((b.detach().abs().max().item() for b in gb if b is not None and b.numel()), default=0.0)
    for i, (a, b) in enumerate(zip(ga, gb)):
        if a is None or b is None:
            assert a is None and b is None, f"{what}: parameter {i} gradient None on one side only"
            continue
        err = (a.detach().double() - b.detach().double()).abs().max().item() if b.numel() else 0.0
        assert err <= rtol * max(scale, 1e-300), (
            f"{what} param {i}: max|a-b| = {err:.3e} > {rtol:g} * max|grad| = {rtol * scale:.3e}")


def row_cosine(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine between ``a - x`` and ``b - x`` (in fp64)."""
    da = (a - x).flatten(1).double()
    db = (b - x).flatten(1).double()
    return torch.nn.functional.cosine_similarity(da, db, dim=1)
