"""The baselines of issue 14 (PGD-AT, TRADES, FGSM-RS) against their plain-PyTorch
twins in ater_ext.reference (value and parameter gradients, fp64), their
BatchNorm and RNG semantics, their bad input, and their cost in forward
equivalents counted with a dispatch mode."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _counting import CountMatmuls
from _models import buffers, close, close_grads, make, param_grads
from ater_ext import backward_into_parameters, objectives, reference

RTOL = 1e-10


def _pair(kind="bn", seed=0):
    model, x, y = make(kind, batch=12, seed=seed)
    return model, copy.deepcopy(model), x, y


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("clean_weight", [0.0, 0.3])
def test_pgd_at_equals_reference(norm, clean_weight):
    model, twin, x, y = _pair()
    eps = 1.0 if norm == "l2" else 0.1
    loss, stats = objectives.pgd_at_loss(model, x, y, eps=eps, norm=norm, steps=4, random_start=False,
                                         clean_weight=clean_weight)
    ref = reference.ref_pgd_at_loss(twin, x, y, eps=eps, norm=norm, steps=4, clean_weight=clean_weight)
    close(loss, ref, RTOL, "loss")
    close_grads(param_grads(loss, model), param_grads(ref, twin), RTOL, "grads")
    for name, b in buffers(twin).items():  # one training forward each: the same running statistics
        close(dict(model.named_buffers())[name], b, RTOL, name)
    assert stats["loss"] == pytest.approx(ref.item(), rel=1e-6)  # stats are fp32 floats


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_at_random_start_equals_reference(norm):
    model, twin, x, y = _pair(seed=1)
    eps = 1.0 if norm == "l2" else 0.1
    loss, _ = objectives.pgd_at_loss(model, x, y, eps=eps, norm=norm, steps=3,
                                     generator=torch.Generator().manual_seed(7))
    start = reference.ref_uniform_start(x, eps, norm, torch.Generator().manual_seed(7))
    ref = reference.ref_pgd_at_loss(twin, x, y, eps=eps, norm=norm, steps=3, start=start)
    close(loss, ref, RTOL, "loss")
    close_grads(param_grads(loss, model), param_grads(ref, twin), RTOL, "grads")


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_trades_equals_reference(norm):
    model, twin, x, y = _pair(seed=2)
    eps = 1.0 if norm == "l2" else 0.1
    loss, stats = objectives.trades_loss(model, x, y, eps=eps, norm=norm, beta=6.0, steps=4,
                                         generator=torch.Generator().manual_seed(3))
    noise = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    ref = reference.ref_trades_loss(twin, x, y, eps=eps, norm=norm, beta=6.0, steps=4, noise=noise)
    close(loss, ref, RTOL, "loss")
    close_grads(param_grads(loss, model), param_grads(ref, twin), RTOL, "grads")
    for name, b in buffers(twin).items():  # only the clean forward updates BatchNorm
        close(dict(model.named_buffers())[name], b, RTOL, name)
    assert stats["kl"] > 0


def test_fgsm_rs_equals_reference():
    model, twin, x, y = _pair(seed=3)
    loss, _ = objectives.fgsm_rs_loss(model, x, y, eps=0.1, generator=torch.Generator().manual_seed(5))
    start = reference.ref_uniform_start(x, 0.1, "linf", torch.Generator().manual_seed(5))
    ref = reference.ref_fgsm_rs_loss(twin, x, y, eps=0.1, start=start)
    close(loss, ref, RTOL, "loss")
    close_grads(param_grads(loss, model), param_grads(ref, twin), RTOL, "grads")


def test_attack_passes_leave_batchnorm_to_the_training_forward():
    """The running statistics after pgd_at_loss are those of exactly one forward of x_adv."""
    model, x, y = make("bn", batch=12, seed=4)
    before = buffers(model)
    objectives.pgd_at_loss(model, x, y, eps=1.0, steps=5, random_start=False)
    after = buffers(model)
    assert int(after["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"]) + 1


def test_dropout_attack_uses_one_mask_and_rng_is_not_clobbered():
    model, x, y = make("dropout", batch=12, seed=5)
    torch.manual_seed(11)
    a, _ = objectives.pgd_at_loss(model, x, y, eps=1.0, steps=3)
    torch.manual_seed(11)
    b, _ = objectives.pgd_at_loss(model, x, y, eps=1.0, steps=3)
    assert torch.equal(a, b), "the same global seed must give the same loss"


@pytest.mark.parametrize("call, match", [
    (lambda m, x, y: objectives.pgd_at_loss(m, x, y, steps=0), "steps must be an integer >= 1"),
    (lambda m, x, y: objectives.pgd_at_loss(m, x, y, norm="l1"), "norm must be one of"),
    (lambda m, x, y: objectives.pgd_at_loss(m, x, y, eps=float("inf")), "eps must be finite"),
    (lambda m, x, y: objectives.pgd_at_loss(m, x, y, eps=0.0), "eps must be finite and > 0"),
    (lambda m, x, y: objectives.pgd_at_loss(m, x, y, clean_weight=1.5), "clean_weight must be in"),
    (lambda m, x, y: objectives.trades_loss(m, x, y, beta=0.0), "beta must be finite and > 0"),
    (lambda m, x, y: objectives.trades_loss(m, x, y, steps=2.5), "steps must be an integer"),
    (lambda m, x, y: objectives.fgsm_rs_loss(m, x, y, eps=-1.0), "eps must be finite and > 0"),
])
def test_bad_input_is_named(call, match):
    model, x, y = make("tanh", batch=4)
    with pytest.raises(ValueError, match=match):
        call(model, x, y)


# --------------------------------------------------------------------- cost
D, LAYERS, B = 16, 3, 8


def _uniform_mlp():
    """LAYERS equal Linear(D, D) layers: every layer's products have the same size."""
    torch.manual_seed(0)
    layers = []
    for i in range(LAYERS):
        layers += [nn.Linear(D, D)] + ([nn.Tanh()] if i < LAYERS - 1 else [])
    return nn.Sequential(*layers).double()


# Forward equivalents of one step with the step's backward into the parameters
# (backward_into_parameters, as TrainStep and ater-train run it): a forward is 1,
# an input-gradient backward 1, a parameter backward 2 less the first layer's input
# gradient that nobody needs (1 / LAYERS).
SKIP = 1.0 / LAYERS
COSTS = {
    "erm": (lambda m, x, y: objectives.erm_loss(m, x, y), 3 - SKIP),
    "at": (lambda m, x, y: objectives.at_loss(m, x, y), 6 - SKIP),
    "pgd-at k=4": (lambda m, x, y: objectives.pgd_at_loss(m, x, y, steps=4), 2 * 4 + 3 - SKIP),
    "pgd-at k=10": (lambda m, x, y: objectives.pgd_at_loss(m, x, y, steps=10), 2 * 10 + 3 - SKIP),
    "pgd-at k=4 mix": (lambda m, x, y: objectives.pgd_at_loss(m, x, y, steps=4, clean_weight=0.5),
                       2 * 4 + 2 * (3 - SKIP)),
    "trades k=4": (lambda m, x, y: objectives.trades_loss(m, x, y, steps=4), 2 * 4 + 6 - 2 * SKIP),
    "fgsm-rs": (lambda m, x, y: objectives.fgsm_rs_loss(m, x, y), 5 - SKIP),
    "ater": (lambda m, x, y: objectives.ater_loss(m, x, y), 14 - 2 * SKIP),
}


@pytest.mark.parametrize("name", list(COSTS))
def test_cost_in_forward_equivalents(name):
    fn, expected = COSTS[name]
    model = _uniform_mlp()
    x = torch.randn(B, D, dtype=torch.float64)
    y = torch.randint(0, D, (B,))
    with CountMatmuls() as counter:
        loss, _ = fn(model, x, y)
        backward_into_parameters(loss, model)
    assert counter.macs / (B * D * D * LAYERS) == pytest.approx(expected, abs=1e-12)
