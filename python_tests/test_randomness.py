"""Random draws across the extra passes without the global RNG (issue 13, item 7).

The passes replay the first pass's draws from a thread-local tape instead of
setting the global generator: another thread's draws are never repeated, two
threads give what sequential runs give, and the values still equal the
reference's, which restores the global state before every pass."""
from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ater_ext
from ater_ext import objectives as O
from ater_ext import reference as R

from _models import close, close_grads, make, param_grads

F64 = torch.float64


def test_other_threads_draws_are_never_repeated():
    """A thread drawing randint while the passes run gets no duplicate (plain torch gets none)."""
    model, x, y = make("dropout", batch=32)
    fixed = ater_ext.capture_rng_state(x.device)
    stop = threading.Event()
    draws = []

    def drawer():
        while not stop.is_set():
            draws.append(torch.randint(0, 2 ** 62, (256,)))

    thread = threading.Thread(target=drawer)
    thread.start()
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            ater_ext.energy_reg(model, x, y)
            O.ater_loss(model, x, y)
            ater_ext.x_max(model, x, y, rng_state=fixed)
            O.vat_loss(model, x)
    finally:
        stop.set()
        thread.join()
    values = torch.cat(draws)
    assert len(draws) > 20, "the drawer thread hardly ran: the test checks nothing"
    assert values.numel() - values.unique().numel() == 0


def _runs(model, x, y, state, repeats):
    out = []
    for _ in range(repeats):
        out.append(ater_ext.energy_reg(model, x, y, rng_state=state, reduction="none").detach())
        out.append(ater_ext.x_max(model, x, y, rng_state=state))
    return out


def test_two_dropout_models_in_two_threads_equal_sequential_runs():
    runs = []
    for seed in (0, 1):
        model, x, y = make("dropout", batch=32, seed=seed)
        torch.manual_seed(100 + seed)
        runs.append((model, x, y, ater_ext.capture_rng_state(x.device)))
    sequential = [_runs(*r, repeats=1)[:2] for r in runs]
    results = [None, None]

    def work(i):
        results[i] = _runs(*runs[i], repeats=20)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(results[i]) == 40
        for j, got in enumerate(results[i]):
            close(got, sequential[i][j % 2], 1e-12, f"thread {i}, result {j}")


def test_global_rng_left_alone_with_rng_state_and_advanced_like_one_forward_without():
    model, x, y = make("dropout")
    state = ater_ext.capture_rng_state(x.device)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    ater_ext.energy_reg(model, x, y, rng_state=state)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(3)
    with torch.no_grad():
        model(x)
    after_one_forward = torch.get_rng_state()
    torch.manual_seed(3)
    ater_ext.energy_reg(model, x, y)
    assert torch.equal(torch.get_rng_state(), after_one_forward)


class NoisyNet(nn.Module):
    """Randomness of every kind the tape handles: functional dropout in forward,
    channel dropout, alpha dropout, an in-place sampler and a factory sampler."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.lin = nn.Linear(4 * 8 * 8, 16)
        self.out = nn.Linear(16, 10)
        self.drop2d = nn.Dropout2d(0.25)
        self.alpha = nn.AlphaDropout(0.2)

    def forward(self, x):
        h = self.drop2d(torch.tanh(self.conv(x)))
        h = F.dropout(torch.tanh(self.lin(h.flatten(1))), 0.3, training=self.training)
        h = self.alpha(h) + 0.05 * torch.empty_like(h).normal_() + 0.05 * torch.rand(h.shape, dtype=h.dtype)
        return self.out(h)


def _noisy():
    torch.manual_seed(0)
    model = NoisyNet().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 1, 8, 8, generator=gen, dtype=F64)
    return model, x, torch.randint(0, 10, (12,), generator=gen)


@pytest.mark.parametrize("direction,penalty", [("fd", "exact"), ("hvp", "fd")])
def test_every_kind_of_draw_is_replayed_as_the_reference_restores_it(direction, penalty):
    model, x, y = _noisy()
    torch.manual_seed(11)
    got = ater_ext.energy_reg(model, x, y, direction=direction, penalty=penalty, reduction="none")
    torch.manual_seed(11)
    want = R.ref_energy_reg(model, x, y, direction=direction, penalty=penalty, reduction="none")
    close(got, want, 1e-9, "energy_reg, noisy model")
    close_grads(param_grads(got.sum(), model), param_grads(want.sum(), model), 1e-9, "grads")
    # with a given state: that state's draws, bit for bit as the caller's own forward
    torch.manual_seed(12)
    state = ater_ext.capture_rng_state(x.device)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    got = ater_ext.x_max(model, x, y, grad_x=g, rng_state=state)
    close(got, R.ref_x_max(model, x, y, grad_x=g, rng_state=(state[0], None)), 1e-9, "x_max from a state")
    torch.manual_seed(13)
    a = O.ater_loss(model, x, y)[0]
    torch.manual_seed(13)
    close(a, R.ref_ater_loss(model, x, y), 1e-9, "ater_loss, noisy model")


class AttentionNet(nn.Module):
    """Attention dropout and RNN dropout: drawn inside ATen kernels (no generator to pass)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
        self.rnn = nn.GRU(8, 8, num_layers=2, dropout=0.3, batch_first=True)
        self.out = nn.Linear(8, 10)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        h, _ = self.rnn(torch.tanh(h))
        return self.out(h.mean(1))


def test_draws_inside_aten_kernels_are_replayed():
    torch.manual_seed(0)
    model = AttentionNet().double()
    x = torch.randn(6, 5, 8, dtype=F64)
    y = torch.randint(0, 10, (6,))
    torch.manual_seed(21)
    got = ater_ext.x_max(model, x, y)
    torch.manual_seed(21)
    close(got, R.ref_x_max(model, x, y), 1e-9, "x_max with attention and GRU dropout")
    torch.manual_seed(22)
    a = ater_ext.energy_reg(model, x, y, penalty="fd", reduction="none")
    torch.manual_seed(22)
    close(a, R.ref_energy_reg(model, x, y, penalty="fd", reduction="none"), 1e-9, "energy_reg")


def test_a_model_drawing_differently_per_pass_is_refused():
    class Moody(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(20, 10)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            h = self.lin(x)
            return h + torch.rand_like(h) if self.calls > 1 else torch.nn.functional.dropout(h, 0.2)

    model, x, y = Moody().double(), *make("tanh")[1:]
    with pytest.raises(RuntimeError, match=r"random draws differ between the passes .*draw 1: rand_like here, "
                                           r"dropout in the first pass"):
        ater_ext.x_max(model, x, y)


def test_draws_inside_aten_kernels_are_refused_during_cuda_graph_capture(monkeypatch):
    from ater_ext import randomness
    monkeypatch.setattr(randomness, "_is_capturing", lambda device: True)
    torch.manual_seed(0)
    model = AttentionNet().double()
    x, y = torch.randn(4, 5, 8, dtype=F64), torch.randint(0, 10, (4,))
    with pytest.raises(RuntimeError, match="multi_head_attention_forward draws random numbers .* CUDA graph"):
        ater_ext.x_max(model, x, y)
