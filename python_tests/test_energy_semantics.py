"""Training-mode semantics of ater_ext.energy_reg / ater_ext.x_max (SPEC.md
"Training-mode semantics") and their input checking.

* BatchNorm running statistics and ``num_batches_tracked`` are bit-identical
  afterwards, and a backward through a graph that was alive meanwhile works;
* dropout: pass 1, pass 2 and the penalty see the same mask, so on the smooth
  (tanh) test model the finite difference equals the exact HVP of the network
  with that mask;
* ``.grad`` stays None, the train/eval mode of every submodule is unchanged,
  also when an exception is raised inside;
* bad input raises an error that names the function.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ater_ext
from ater_ext import reference as R

from _models import (assert_buffers_equal, buffers, close, close_grads, make, param_grads, params,
                     row_cosine)

F64 = torch.float64
COMBOS = [pytest.param(d, p, id=f"{d}-{p}") for d in ("fd", "hvp") for p in ("exact", "fd")]


def modes(model: nn.Module):
    return [m.training for m in model.modules()]


# -------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("direction,penalty", COMBOS)
def test_batchnorm_buffers_untouched_by_energy_reg(direction, penalty):
    model, x, y = make("bn")
    before = buffers(model)
    objects = dict(model.named_buffers())
    e = ater_ext.energy_reg(model, x, y, direction=direction, penalty=penalty)
    assert_buffers_equal(model, before)
    assert all(b is objects[n] for n, b in model.named_buffers()), "buffers must be the same tensor objects"
    e.backward()
    assert_buffers_equal(model, before)
    assert all(p.grad is not None for p in params(model))


@pytest.mark.parametrize("direction", ["fd", "hvp"])
def test_batchnorm_buffers_untouched_by_x_max(direction):
    model, x, y = make("bn")
    before = buffers(model)
    ater_ext.x_max(model, x, y, direction=direction)
    assert_buffers_equal(model, before)


def test_batchnorm_backward_through_live_clean_graph():
    """The caller's clean forward (which updates the buffers) is alive while
    energy_reg runs; backward through both afterwards has no version-counter error."""
    model, x, y = make("bn")
    ref = copy.deepcopy(model)
    logits = model(x)  # updates running stats once
    ref(x)
    after_clean = buffers(ref)
    e = ater_ext.energy_reg(model, x, y)
    assert_buffers_equal(model, after_clean)
    (F.cross_entropy(logits, y) + 0.1 * e).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params(model))
    assert_buffers_equal(model, after_clean)


def test_batchnorm_momentum_none_counts_nothing():
    """Cumulative-average BatchNorm (momentum=None) reads num_batches_tracked: it must not move either."""
    model, x, y = make("bn")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = None
    model(x)
    before = buffers(model)
    ater_ext.energy_reg(model, x, y).backward()
    ater_ext.x_max(model, x, y)
    assert_buffers_equal(model, before)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("direction,penalty", COMBOS)
def test_batchnorm_values_match_reference(direction, penalty, train):
    """Train mode: batch statistics in every pass; eval mode: running statistics."""
    model, x, y = make("bn", train=train)
    if not train:  # non-trivial running statistics
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    kw = dict(direction=direction, penalty=penalty, reduction="none")
    got = ater_ext.energy_reg(model, x, y, **kw)
    want = R.ref_energy_reg(model, x, y, **kw)
    close(got, want, 1e-9, "energy_reg with BatchNorm")
    w = torch.linspace(0.5, 1.5, x.shape[0], dtype=F64)
    close_grads(param_grads((got * w).sum(), model), param_grads((want * w).sum(), model), 1e-9, "grads")
    close(ater_ext.x_max(model, x, y, direction=direction), R.ref_x_max(model, x, y, direction=direction),
          1e-9, "x_max with BatchNorm")
    assert model.training == train


def test_batchnorm_train_mode_uses_batch_statistics():
    """x_max in train mode differs from x_max of the same network in eval mode
    (running stats at init: 0 / 1): the passes really use batch statistics."""
    model, x, y = make("bn")
    x = 3 * x + 1  # batch statistics far from the initial running ones
    a = ater_ext.x_max(model, x, y)
    model.eval()
    b = ater_ext.x_max(model, x, y)
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------------- Dropout
class FixedMask(nn.Module):
    """Dropout with a given mask (already scaled by 1 / (1 - p))."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, h):
        return h * self.mask


def _capture_mask(model, x, seed):
    """The mask nn.Dropout draws in a forward from ``torch.manual_seed(seed)``."""
    drop = next(m for m in model.modules() if isinstance(m, nn.Dropout))
    seen = {}

    def hook(mod, inp, out):
        seen["mask"] = torch.where(inp[0] != 0, out / inp[0], torch.zeros_like(out)).detach()

    h = drop.register_forward_hook(hook)
    torch.manual_seed(seed)
    with torch.no_grad():
        model(x)
    h.remove()
    return seen["mask"]


def _with_mask(model, mask):
    twin = copy.deepcopy(model)
    for name, m in twin.named_children():
        if isinstance(m, nn.Dropout):
            setattr(twin, name, FixedMask(mask))
    return twin


def test_dropout_fd_direction_equals_hvp_with_the_same_mask():
    model, x, y = make("dropout", batch=64)
    seed = 1234
    mask = _capture_mask(model, x, seed)
    assert (mask == 0).any() and (mask > 1).any()
    twin = _with_mask(model, mask)  # deterministic network with that mask
    exact = R.ref_x_max(twin, x, y, direction="hvp")

    torch.manual_seed(seed)
    fd = ater_ext.x_max(model, x, y)
    cos = row_cosine(fd, exact, x)
    assert cos.min() >= 0.999, cos.min()
    assert cos.median() >= 1 - 1e-9, cos.median()  # fp64, xi = 1e-6: O(xi) truncation

    torch.manual_seed(seed)
    hvp = ater_ext.x_max(model, x, y, direction="hvp")
    close(hvp, exact, 1e-9, "hvp with dropout")

    # the penalty pass uses the same mask too
    torch.manual_seed(seed)
    e = ater_ext.energy_reg(model, x, y, reduction="none")
    e_twin = ater_ext.energy_reg(twin, x, y, reduction="none")
    close(e, e_twin, 1e-9, "energy with dropout vs the fixed-mask twin")
    close_grads(param_grads(e.sum(), model), param_grads(e_twin.sum(), twin), 1e-9, "grads with dropout")

    # negative control: another mask gives another x_max (the test can fail)
    other = _with_mask(model, _capture_mask(model, x, seed + 1))
    assert row_cosine(fd, R.ref_x_max(other, x, y, direction="hvp"), x).min() < 0.99


@pytest.mark.parametrize("penalty", ["exact", "fd"])
def test_dropout_matches_reference_with_the_same_seed(penalty):
    model, x, y = make("dropout")
    torch.manual_seed(7)
    got = ater_ext.energy_reg(model, x, y, penalty=penalty, reduction="none")
    torch.manual_seed(7)
    want = R.ref_energy_reg(model, x, y, penalty=penalty, reduction="none")
    close(got, want, 1e-9, "energy_reg with dropout")
    close_grads(param_grads(got.sum(), model), param_grads(want.sum(), model), 1e-9, "grads with dropout")


def test_dropout_rng_state_argument_reuses_a_forward_masks():
    """rng_state= (captured before the caller's forward) makes the passes use that forward's mask."""
    model, x, y = make("dropout", batch=32)
    torch.manual_seed(99)
    state = ater_ext.capture_rng_state(x.device)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    torch.manual_seed(5)  # whatever the RNG does in between
    xm = ater_ext.x_max(model, x, y, grad_x=g, rng_state=state)
    torch.manual_seed(99)
    ref_state = (torch.get_rng_state(), None)
    torch.manual_seed(5)
    close(xm, R.ref_x_max(model, x, y, grad_x=g, rng_state=ref_state), 1e-9, "x_max vs reference, same state")
    # The fixed-mask twin multiplies by a mask recovered as out / in (an ulp
    # off 1 / (1 - p)), which xi = 1e-6 amplifies to ~1e-9 relative.
    twin = _with_mask(model, _capture_mask(model, x, 99))
    close(xm, R.ref_x_max(twin, x, y), 1e-8, "x_max from the forward's mask")


# -------------------------------------------------------------- .grad and modes
CALLS = {
    "energy_reg": lambda m, x, y: ater_ext.energy_reg(m, x, y),
    "energy_reg_hvp_fd": lambda m, x, y: ater_ext.energy_reg(m, x, y, direction="hvp", penalty="fd"),
    "x_max": lambda m, x, y: ater_ext.x_max(m, x, y),
    "x_max_hvp": lambda m, x, y: ater_ext.x_max(m, x, y, direction="hvp"),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["tanh", "bn", "dropout"])
@pytest.mark.parametrize("call", list(CALLS))
def test_grad_buffers_and_mode_untouched(call, kind, train):
    model, x, y = make(kind, train=train)
    before_modes = modes(model)
    before = buffers(model)
    out = CALLS[call](model, x, y)
    assert all(p.grad is None for p in params(model)), ".grad written before the caller's backward"
    assert modes(model) == before_modes
    assert_buffers_equal(model, before)
    if call.startswith("x_max"):
        assert out.grad_fn is None and not out.requires_grad
    else:
        assert out.requires_grad


def test_mixed_modes_are_kept():
    """A BatchNorm in eval mode inside a model in train mode (frozen BN): each module keeps its own mode."""
    model, x, y = make("bn")
    model[1].eval()
    before = modes(model)
    ater_ext.energy_reg(model, x, y)
    assert modes(model) == before


def test_existing_grads_are_kept():
    """Gradients the caller already accumulated are neither zeroed nor changed."""
    model, x, y = make("tanh")
    F.cross_entropy(model(x), y).backward()
    saved = [p.grad.clone() for p in params(model)]
    e = ater_ext.energy_reg(model, x, y)
    ater_ext.x_max(model, x, y)
    assert all(torch.equal(p.grad, s) for p, s in zip(params(model), saved))
    g_e = torch.autograd.grad(e, params(model), retain_graph=True)
    e.backward()
    for p, s, ge in zip(params(model), saved, g_e):
        close(p.grad, s + ge, 1e-12, "accumulated")


def test_x_max_under_no_grad_equals_outside():
    model, x, y = make("tanh")
    with torch.no_grad():
        a = ater_ext.x_max(model, x, y)
    close(a, ater_ext.x_max(model, x, y), 0.0, "x_max under no_grad")


@pytest.mark.parametrize("fail_at", [1, 2, 3], ids=["pass1", "pass2", "penalty"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_state_restored_when_an_exception_is_raised(fail_at, train):
    model, x, y = make("bn", train=train)
    before_modes = modes(model)
    before = buffers(model)
    objects = dict(model.named_buffers())
    calls = {"n": 0}

    class Boom(Exception):
        pass

    def loss_fn(logits, target, reduction="mean"):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise Boom(f"call {fail_at}")
        return F.cross_entropy(logits, target, reduction=reduction)

    with pytest.raises(Boom):
        ater_ext.energy_reg(model, x, y, loss_fn=loss_fn)
    assert modes(model) == before_modes
    assert_buffers_equal(model, before)
    assert all(b is objects[n] for n, b in model.named_buffers())
    assert all(p.grad is None for p in params(model))
    # and the model still works normally afterwards
    e = ater_ext.energy_reg(model, x, y)
    close(e, R.ref_energy_reg(model, x, y), 1e-9, "energy after an exception")


def test_state_restored_when_the_model_raises():
    """An exception inside the model's forward during an extra pass."""
    model, x, y = make("bn")
    before = buffers(model)
    n = {"calls": 0}

    def hook(mod, inp):
        n["calls"] += 1
        if n["calls"] == 2:
            raise RuntimeError("model failure")

    h = model[0].register_forward_pre_hook(hook)
    with pytest.raises(RuntimeError, match="model failure"):
        ater_ext.energy_reg(model, x, y)
    h.remove()
    assert model.training
    assert_buffers_equal(model, before)
    assert all(p.grad is None for p in params(model))


# ---------------------------------------------------------------------- errors
def test_energy_reg_under_no_grad_raises():
    model, x, y = make("tanh")
    with torch.no_grad(), pytest.raises(RuntimeError, match="energy_reg"):
        ater_ext.energy_reg(model, x, y)


def test_energy_reg_without_trainable_parameters_raises():
    model, x, y = make("tanh")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises((RuntimeError, ValueError), match="energy_reg"):
        ater_ext.energy_reg(model, x, y)


@pytest.mark.parametrize("fn", ["energy_reg", "x_max"])
def test_batch_size_mismatch_names_the_shapes(fn):
    model, x, y = make("tanh", batch=8)
    with pytest.raises((RuntimeError, ValueError), match=fn) as info:
        getattr(ater_ext, fn)(model, x, y[:7])
    msg = str(info.value)
    assert "8" in msg and "7" in msg, msg


@pytest.mark.parametrize("fn", ["energy_reg", "x_max"])
def test_grad_x_shape_mismatch_raises(fn):
    model, x, y = make("tanh", batch=8)
    with pytest.raises((RuntimeError, ValueError), match=fn):
        getattr(ater_ext, fn)(model, x, y, grad_x=torch.zeros(8, 19, dtype=F64))


BAD_SCALARS = [("eps", 0.0), ("eps", -1.0), ("eps", math.nan), ("eps", math.inf), ("xi", 0.0), ("xi", -1e-3),
               ("xi", math.nan)]


@pytest.mark.parametrize("fn", ["energy_reg", "x_max"])
@pytest.mark.parametrize("name,value", BAD_SCALARS, ids=[f"{n}={v}" for n, v in BAD_SCALARS])
def test_bad_scalars_raise_value_error(fn, name, value):
    model, x, y = make("tanh")
    with pytest.raises(ValueError, match=fn):
        getattr(ater_ext, fn)(model, x, y, **{name: value})


@pytest.mark.parametrize("value", [0.0, -1e-2, math.inf])
def test_bad_fd_h_raises(value):
    model, x, y = make("tanh")
    with pytest.raises(ValueError, match="energy_reg"):
        ater_ext.energy_reg(model, x, y, penalty="fd", fd_h=value)


@pytest.mark.parametrize("kw", [dict(direction="central"), dict(penalty="approx"), dict(reduction="max")],
                         ids=["direction", "penalty", "reduction"])
def test_unknown_choices_raise_value_error(kw):
    model, x, y = make("tanh")
    with pytest.raises(ValueError, match="energy_reg"):
        ater_ext.energy_reg(model, x, y, **kw)
    if "direction" in kw:
        with pytest.raises(ValueError, match="x_max"):
            ater_ext.x_max(model, x, y, **kw)
