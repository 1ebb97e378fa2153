"""ater_ext.objectives against the plain-autograd reference and the papers'
definitions: ERM, AT (L2, one step), VAT (Miyato et al.), ATER (Eq. 11,
Algorithm 1) and VATER (Eq. 12, Algorithm 2).

fp64 throughout; the same seed before the fast objective and the reference so
that VAT's start direction ``d0 = randn_like(x)`` (the first random draw) is
the same on both sides. Each side runs on its own copy of the model, because
the clean forward updates BatchNorm's running statistics.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ater_ext
from ater_ext import objectives as O
from ater_ext import reference as R

from _models import assert_buffers_equal, buffers, close, close_grads, make, param_grads, params

F64 = torch.float64
RTOL = 1e-9  # fp64; FD probe differences amplify ulps by 1 / xi = 1e6
# VAT: the power iteration's d = grad_r KL at |r| = xi_vat = 1e-6 carries
# ~1e-10 relative rounding, which the KL Hessian's small eigen-gap amplifies
# again; two correct fp64 implementations (the reference and the paper's
# formula below) differ by up to 7e-9 in the loss and 7e-8 in the gradients
# (seeds 0-2, ip = 1..3). A wrong VAT is off by O(1).
VAT_RTOL = 1e-6


def rtol_of(name):
    return VAT_RTOL if name in ("vat", "vater") else RTOL
KINDS = ["tanh", "cnn", "bn"]


def _split(x, y, n_l):
    return x[:n_l], y[:n_l], x[n_l:]


def _run(kind, name, seed=3, **kw):
    """(fast loss, stats, fast model), (reference loss, reference model) from identical copies."""
    model, x, y = make(kind, batch=24)
    twin = copy.deepcopy(model)
    torch.manual_seed(seed)
    if name == "vater":
        xl, yl, xu = _split(x, y, 10)
        loss, stats = O.vater_loss(model, xl, yl, xu, **kw)
        torch.manual_seed(seed)
        ref = R.ref_vater_loss(twin, xl, yl, xu, **kw)
    elif name == "vat":
        loss, stats = O.vat_loss(model, x, **kw)
        torch.manual_seed(seed)
        ref = R.ref_vat_loss(twin, x, **kw)
    else:
        fast = {"erm": O.erm_loss, "at": O.at_loss, "ater": O.ater_loss}[name]
        slow = {"erm": R.ref_erm_loss, "at": R.ref_at_loss, "ater": R.ref_ater_loss}[name]
        loss, stats = fast(model, x, y, **kw)
        torch.manual_seed(seed)
        ref = slow(twin, x, y, **kw)
    return (loss, stats, model), (ref, twin), x


OBJECTIVES = {
    "erm": {},
    "at": {"eps_adv": 1.5},
    "vat": {"eps_vat": 1.5},
    "ater": {"eps_adv": 1.5, "eps": 1.0, "lam": 0.5},
    "vater": {"eps_vat": 1.5, "eps": 1.0, "lam": 0.5},
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_matches_reference(name, kind):
    (loss, stats, model), (ref, twin), _ = _run(kind, name, **OBJECTIVES[name])
    assert loss.shape == () and loss.dtype == F64
    close(loss, ref, rtol_of(name), f"{name} loss")
    close_grads(param_grads(loss, model), param_grads(ref, twin), rtol_of(name), f"{name} gradients")
    assert isinstance(stats, dict) and stats
    assert all(isinstance(v, float) for v in stats.values()), stats


@pytest.mark.parametrize("name", ["vat", "vater"])
def test_vat_power_iterations_match_reference(name):
    (loss, _, model), (ref, twin), _ = _run("tanh", name, ip=3)
    close(loss, ref, VAT_RTOL, f"{name} ip=3")
    close_grads(param_grads(loss, model), param_grads(ref, twin), VAT_RTOL, f"{name} ip=3 gradients")


def test_objectives_at_default_arguments_match_reference():
    for name in OBJECTIVES:
        (loss, _, model), (ref, twin), _ = _run("tanh", name)
        close(loss, ref, rtol_of(name), f"{name} at defaults")


def test_erm_is_cross_entropy():
    model, x, y = make("tanh")
    loss, stats = O.erm_loss(model, x, y)
    want = F.cross_entropy(model(x), y)
    close(loss, want, 0.0, "erm")
    close_grads(param_grads(loss, model), param_grads(want, model), 0.0, "erm grads")
    assert all(isinstance(v, float) for v in stats.values())


# ------------------------------------------------------------- cross-checks
def test_ater_is_at_plus_lam_energy():
    """Eq. 11: ATER - AT = lam * energy_reg, and ATER(lam=0) = AT."""
    model, x, y = make("tanh")
    at, _ = O.at_loss(model, x, y, eps_adv=1.5)
    ater0, _ = O.ater_loss(model, x, y, eps_adv=1.5, lam=0.0)
    close(ater0, at, 1e-12, "ater(lam=0)")
    ater, stats = O.ater_loss(model, x, y, eps_adv=1.5, eps=1.0, lam=0.5)
    e = ater_ext.energy_reg(model, x, y, eps=1.0)
    close(ater - at, 0.5 * e, 1e-9, "ater - at")
    close_grads(param_grads(ater, model), [a + 0.5 * b for a, b in zip(param_grads(at, model), param_grads(e, model))],
                1e-9, "d(ater)")


def test_at_adversarial_point_is_the_normalised_gradient_step():
    """AT's second term is the CE at x + eps_adv * g / ||g||, written out."""
    model, x, y = make("tanh")
    loss, _ = O.at_loss(model, x, y, eps_adv=1.5)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    x_adv = x + 1.5 * g / g.norm(dim=1, keepdim=True)
    want = F.cross_entropy(model(x), y) + F.cross_entropy(model(x_adv), y)
    close(loss, want, 1e-12, "at")


def _vat_by_definition(model, x, d0, eps_vat, xi_vat, ip):
    """VAT as Miyato et al. write it (and their code does): F.kl_div with the
    clean prediction detached, power iteration on a random start."""
    with torch.no_grad():
        p = F.softmax(model(x), dim=1)
    d = d0
    for _ in range(ip):
        r = (xi_vat * d / d.flatten(1).norm(dim=1).view(-1, *[1] * (d.dim() - 1))).requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x + r), dim=1), p, reduction="batchmean")
        (d,) = torch.autograd.grad(kl, r)
    r_vat = eps_vat * d / d.flatten(1).norm(dim=1).view(-1, *[1] * (d.dim() - 1))
    return F.kl_div(F.log_softmax(model(x + r_vat), dim=1), p, reduction="batchmean")


@pytest.mark.parametrize("ip", [1, 2])
@pytest.mark.parametrize("kind", ["tanh", "cnn"])
def test_vat_matches_its_paper_definition(kind, ip):
    model, x, _ = make(kind)
    torch.manual_seed(11)
    loss, _ = O.vat_loss(model, x, eps_vat=1.5, ip=ip)
    torch.manual_seed(11)
    d0 = torch.randn_like(x)
    want = _vat_by_definition(model, x, d0, 1.5, 1e-6, ip)
    close(loss, want, VAT_RTOL, "vat")
    # p(x) is a constant: the gradient is that of -sum p log q only
    close_grads(param_grads(loss, model), param_grads(want, model), VAT_RTOL, "vat gradients")
    assert loss > 0


def test_vat_power_iteration_finds_the_top_eigenvector():
    """Many power iterations: r_vat -> eps * (sign) top eigenvector of the
    Hessian of r -> KL(p(x) || p(x + r)) at r = 0, one sample at a time."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=F64)
    eps_vat = 0.05
    torch.manual_seed(21)
    loss, _ = O.vat_loss(model, x, eps_vat=eps_vat, ip=60)
    torch.manual_seed(21)
    d0 = torch.randn_like(x)
    want = []
    with torch.no_grad():
        p_logits = model(x)
    for i in range(x.shape[0]):
        def kl(r, i=i):
            lp = F.log_softmax(p_logits[i], 0)
            return (lp.exp() * (lp - F.log_softmax(model(x[i] + r), 0))).sum()
        h = torch.autograd.functional.hessian(kl, torch.zeros(4, dtype=F64))
        evals, evecs = torch.linalg.eigh(h)
        assert evals[-1] > 1.5 * evals[-2].abs()  # a gap, so the power iteration converges
        v = evecs[:, -1] * torch.sign(evecs[:, -1] @ d0[i])
        with torch.no_grad():
            want.append(kl(eps_vat * v))
    close(loss, torch.stack(want).mean(), 1e-6, "VAT with ip=60 vs the top eigenvector")


def test_vater_is_ce_plus_vat_plus_lam_energy():
    """Eq. 12 term by term: supervised CE on x_l, VAT on x_l ∪ x_ul, energy with pseudo-labels."""
    model, x, y = make("tanh", batch=24)
    xl, yl, xu = _split(x, y, 10)
    torch.manual_seed(4)
    loss, stats = O.vater_loss(model, xl, yl, xu, eps_vat=1.5, eps=1.0, lam=0.5)
    xa = torch.cat([xl, xu])
    torch.manual_seed(4)
    vat, _ = O.vat_loss(model, xa, eps_vat=1.5)
    with torch.no_grad():
        pseudo = model(xu).argmax(1)
    ya = torch.cat([yl, pseudo])
    e = ater_ext.energy_reg(model, xa, ya, eps=1.0)
    want = F.cross_entropy(model(xl), yl) + vat + 0.5 * e
    close(loss, want, 1e-9, "vater")
    close_grads(param_grads(loss, model), param_grads(want, model), 1e-9, "vater gradients")
    # the pseudo-label matters: true labels for the unlabelled rows give another energy
    e_true = ater_ext.energy_reg(model, xa, y, eps=1.0)
    if not torch.equal(pseudo, y[10:]):
        assert abs(e_true.item() - e.item()) > 1e-6


# --------------------------------------------------------------- semantics
def _call(name, model, x, y, **kw):
    if name == "vater":
        return O.vater_loss(model, x[:10], y[:10], x[10:], **kw)
    if name == "vat":
        return O.vat_loss(model, x, **kw)
    return {"erm": O.erm_loss, "at": O.at_loss, "ater": O.ater_loss}[name](model, x, y, **kw)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_batchnorm_buffers_as_after_one_clean_forward(name):
    """The objective changes BatchNorm's buffers exactly as one clean forward
    of its batch does (vater: of cat(x_l, x_ul)); vat_loss, the VAT term alone
    (added to a loss that has the clean forward), changes nothing."""
    model, x, y = make("bn", batch=24)
    twin = copy.deepcopy(model)
    untouched = buffers(model)
    loss, _ = _call(name, model, x, y)
    if name == "vat":
        assert_buffers_equal(model, untouched)
    else:
        with torch.no_grad():
            twin(x)  # x is cat(x_l, x_ul) for vater
        assert_buffers_equal(model, buffers(twin))
    after = buffers(model)
    loss.backward()  # no version-counter error
    assert_buffers_equal(model, after)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params(model))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["tanh", "bn", "dropout"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_grad_and_mode_untouched(name, kind, train):
    model, x, y = make(kind, batch=24, train=train)
    before = [m.training for m in model.modules()]
    loss, stats = _call(name, model, x, y)
    assert all(p.grad is None for p in params(model)), f"{name}: .grad written before the caller's backward"
    assert [m.training for m in model.modules()] == before
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in params(model))


@pytest.mark.parametrize("name", ["at", "vat", "ater", "vater"])
def test_dropout_objectives_match_reference_with_the_same_seed(name):
    """With dropout, the extra passes reuse the clean forward's masks (same rule in the reference)."""
    (loss, _, model), (ref, twin), _ = _run("dropout", name, **OBJECTIVES[name])
    close(loss, ref, rtol_of(name), f"{name} with dropout")
    close_grads(param_grads(loss, model), param_grads(ref, twin), rtol_of(name), f"{name} gradients with dropout")


def test_objectives_are_deterministic_given_the_seed():
    model, x, y = make("dropout", batch=24)
    for name in OBJECTIVES:
        torch.manual_seed(8)
        a, _ = _call(name, model, x, y)
        torch.manual_seed(8)
        b, _ = _call(name, model, x, y)
        assert torch.equal(a, b), name


def test_objective_errors_name_the_objective():
    model, x, y = make("tanh", batch=8)
    with pytest.raises((ValueError, RuntimeError), match="at_loss"):
        O.at_loss(model, x, y[:7])
    with pytest.raises(ValueError, match="ater_loss"):
        O.ater_loss(model, x, y, eps=0.0)
    with pytest.raises(ValueError, match="ater_loss"):
        O.ater_loss(model, x, y, eps_adv=-1.0)
    with pytest.raises(ValueError, match="vat_loss"):
        O.vat_loss(model, x, eps_vat=float("nan"))
    with pytest.raises((ValueError, RuntimeError), match="vater_loss"):
        O.vater_loss(model, x[:4], y[:3], x[4:])


class _SharedGradients(nn.Module):
    """Its weight is ``w1 + w2`` (autograd hands both parameters one gradient tensor)
    and its scale enters through ``.sum()`` (a stride-0 expanded gradient): the
    objectives' gradient bank must not update either in place."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w1 = nn.Parameter(0.3 * torch.randn(10, 20, generator=g, dtype=F64))
        self.w2 = nn.Parameter(0.3 * torch.randn(10, 20, generator=g, dtype=F64))
        self.scale = nn.Parameter(torch.full((3,), 0.5, dtype=F64))

    def forward(self, x):
        return torch.tanh(x.flatten(1) @ (self.w1 + self.w2).T) * self.scale.sum()


class _InputPlusParameter(nn.Module):
    """Its first op is ``x + p`` with ``p`` of the batch's shape: autograd hands the
    input gradient's tensor to ``p`` too, and pass 1's gradient must survive the
    bank's in-place updates of ``p``'s."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.p = nn.Parameter(0.1 * torch.randn(24, 20, generator=g, dtype=F64))
        self.lin = nn.Linear(20, 10).double()

    def forward(self, x):
        return self.lin(torch.tanh(x.flatten(1) + self.p))


class _SparseBias(nn.Module):
    """A bias looked up with ``F.embedding(sparse=True)``: a sparse gradient in the bank."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(20, 10).double()
        self.table = nn.Parameter(torch.zeros(3, 10, dtype=F64))

    def forward(self, x):
        bias = F.embedding(torch.zeros(1, dtype=torch.long), self.table, sparse=True)
        return self.lin(torch.tanh(x.flatten(1))) + bias


class _SparseBiasPlusParameter(_SparseBias):
    """``bias + p`` with ``p`` of the bias's shape: ``p``'s gradient is the very tensor
    that the sparse gradient of ``table`` holds as its values."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.full((1, 10), 0.1, dtype=F64))

    def forward(self, x):
        bias = F.embedding(torch.zeros(1, dtype=torch.long), self.table, sparse=True)
        return self.lin(torch.tanh(x.flatten(1))) + (bias + self.p)


@pytest.mark.parametrize("model_cls", [_SharedGradients, _InputPlusParameter, _SparseBias, _SparseBiasPlusParameter])
@pytest.mark.parametrize("name", ["at", "ater"])
def test_aliased_expanded_and_sparse_gradients_match_reference(name, model_cls):
    model = model_cls()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(24, 20, generator=g, dtype=F64), torch.randint(0, 10, (24,), generator=g)
    fast = {"at": O.at_loss, "ater": O.ater_loss}[name]
    slow = {"at": R.ref_at_loss, "ater": R.ref_ater_loss}[name]
    kw = OBJECTIVES[name]
    loss, _ = fast(model, x, y, **kw)
    ref = slow(twin, x, y, **kw)
    close(loss, ref, RTOL, f"{name} loss")
    close_grads(_dense(param_grads(loss, model)), _dense(param_grads(ref, twin)), RTOL, f"{name} gradients")


def _dense(grads):
    return [None if g is None else g.to_dense() for g in grads]
