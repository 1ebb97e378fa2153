"""AMP (autocast + GradScaler) and models without double backward."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ater_ext


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 5))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probe_passes_and_direction_run_in_fp32_under_autocast(dtype):
    model, (x, y) = make_model(), batch()
    expected = ater_ext.x_max(model, x, y)  # no autocast: fp32 throughout
    with torch.autocast("cpu", dtype=dtype):
        got = ater_ext.x_max(model, x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_penalty_under_autocast_close_to_fp32(dtype):
    model, (x, y) = make_model(), batch()
    exact = ater_ext.energy_reg(model, x, y)
    with torch.autocast("cpu", dtype=dtype):
        amp = ater_ext.energy_reg(model, x, y)
    assert amp.dtype == torch.float32  # norms in fp32
    # only the penalty's forward/backward ran in low precision
    torch.testing.assert_close(amp, exact, rtol=3e-2, atol=0)


def test_grad_scaler_recipe_fp16():
    """PyTorch's gradient-penalty recipe: the scaled loss inside the gradient, unscaled in fp32;
    scaler.scale(loss).backward() unchanged; the update equals the unscaled one."""
    x, y = batch()
    grads = {}
    for use_scaler in (False, True):
        model = make_model()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if use_scaler else None
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y) + 0.1 * ater_ext.energy_reg(model, x, y, scaler=scaler)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
        else:
            loss.backward()
        grads[use_scaler] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert torch.isfinite(grads[use_scaler]).all()
    torch.testing.assert_close(grads[True], grads[False], rtol=2e-2, atol=1e-4)


def test_objectives_with_a_grad_scaler_train():
    """With the default scale (65536) the fp16 penalty gradient can overflow: as with any
    GradScaler loop, that step is skipped and the scale lowered until steps are finite."""
    model, (x, y) = make_model(), batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(20):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss, stats = ater_ext.objectives.ater_loss(model, x, y, scaler=scaler)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert set(stats) == {"loss", "ce", "adv", "energy", "xmax_grad_ratio"}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # steps were taken


def test_compiled_module_exact_penalty_names_the_way_out():
    model, (x, y) = make_model(), batch()
    compiled = torch.compile(model)
    with pytest.raises(RuntimeError, match=r"energy_reg.*penalty='fd'.*|energy_reg.*_orig_mod"):
        ater_ext.energy_reg(compiled, x, y)


def test_fd_penalty_needs_no_double_backward():
    """penalty='fd' builds no create_graph: it works with a module whose backward is once-differentiable."""

    class OnceDifferentiableTanh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, inp):
            out = torch.tanh(inp)
            ctx.save_for_backward(out)
            return out

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            (out,) = ctx.saved_tensors
            return grad * (1 - out * out)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(20, 32), nn.Linear(32, 5)

        def forward(self, inp):
            return self.b(OnceDifferentiableTanh.apply(self.a(inp)))

    torch.manual_seed(0)
    net, (x, y) = Net(), batch()
    with pytest.raises(RuntimeError):  # the exact penalty needs double backward
        ater_ext.energy_reg(net, x, y).backward()
    net.zero_grad()
    ater_ext.energy_reg(net, x, y, penalty="fd").backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_ater_loss_clean_term_is_backpropagated_once():
    """ater_loss hands the clean loss's precomputed parameter gradients over in the
    caller's backward (the clean graph is traversed once); a second backward says so."""
    model, (x, y) = make_model(), batch()
    loss, _ = ater_ext.objectives.ater_loss(model, x, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()
