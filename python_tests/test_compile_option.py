"""compile=True: the first-order extra passes through torch.compile give the eager
results (fp64, to rounding amplified by the finite difference's 1/xi = 1e6), keep BatchNorm buffers untouched, and leave models
with active dropout on eager passes (so the same-masks guarantee holds)."""
import pytest
import torch
import torch.nn as nn

import ater_ext
from ater_ext.passes import ExtraPasses


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Tanh(), nn.Linear(24, 4)).double()


def batch():
    g = torch.Generator().manual_seed(2)
    return torch.rand(10, 3, 2, 2, generator=g, dtype=torch.float64), torch.randint(0, 4, (10,), generator=g)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def param_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_energy_reg_compiled_equals_eager_and_keeps_buffers():
    x, y = batch()
    results = {}
    for compile in (False, True):
        model = bn_model()
        before = [b.clone() for b in model.buffers()]
        xm = ater_ext.x_max(model, x, y, eps=0.7, compile=compile)
        energy = ater_ext.energy_reg(model, x, y, eps=0.7, compile=compile)
        energy.backward()
        assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
        results[compile] = (xm, energy.detach(), param_grads(model))
    for eager, compiled in zip(results[False], results[True]):
        torch.testing.assert_close(compiled, eager, rtol=1e-7, atol=1e-9)


def test_ater_loss_compiled_equals_eager():
    x, y = batch()
    results = {}
    for compile in (False, True):
        model = bn_model()
        loss, _ = ater_ext.objectives.ater_loss(model, x, y, eps_adv=0.5, eps=0.7, compile=compile)
        loss.backward()
        results[compile] = (loss.detach(), param_grads(model))
    for eager, compiled in zip(results[False], results[True]):
        torch.testing.assert_close(compiled, eager, rtol=1e-7, atol=1e-9)


def test_active_dropout_keeps_eager_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 24), nn.Dropout(0.3), nn.Tanh(), nn.Linear(24, 4)).double()
    x, _ = batch()
    assert ExtraPasses(model, x, compile=True).compile_mode is None
    model.eval()
    assert ExtraPasses(model, x, compile=True).compile_mode == "default"


def test_unknown_compile_mode_is_rejected():
    x, y = batch()
    with pytest.raises(ValueError, match="compile"):
        ater_ext.energy_reg(bn_model(), x, y, compile="fastest")
