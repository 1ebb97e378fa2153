"""Pure-PyTorch twins of ater_ext's fused ops: the tests' oracle.

Written for clarity, not speed, and independent of the fast path (this module
imports nothing from ``ater_ext.ops`` or the compiled extension). Every norm is
the per-row L2 norm over all non-batch dimensions, accumulated in fp32 (fp64
for fp64 inputs), computed the scale-safe way: divide by the row's max-abs
before squaring, so rows of 1e-30 or 1e30 in fp32 still normalise to unit
vectors, and a zero row normalises to zero (never NaN).
"""
from __future__ import annotations

import torch

__all__ = ["acc_dtype", "normalize", "row_norm", "normalized_step", "dual_normalized_step", "fd_direction",
           "fd_sphere_step"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(v: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, D] in the accumulation dtype."""
    return v.reshape(v.shape[0], -1).to(acc_dtype(v.dtype))


def _scaled_rows(v: torch.Tensor):
    """(v / m, m, s) per row with m = max|v| (1 for zero rows) and s = sum (v/m)^2."""
    rows = _rows(v)
    if rows.shape[1] == 0:
        m = rows.new_zeros(rows.shape[0])
    else:
        m = rows.abs().amax(dim=1)
    m = torch.where(m > 0, m, torch.ones_like(m))
    scaled = rows / m[:, None]
    return scaled, m, scaled.square().sum(dim=1)


def normalize(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| per row, in the accumulation dtype, shape [B, D]; zero rows stay 0."""
    scaled, _, s = _scaled_rows(v)
    # Zero rows -> 0; NaN/Inf rows propagate NaN (s is NaN there). The square root is taken of a
    # safe s so that autograd through a zero row gives 0, not 0 * inf = NaN.
    zero = s == 0
    root = torch.where(zero, torch.ones_like(s), s).sqrt()
    return torch.where(zero[:, None], 0.0, scaled / root[:, None])


def row_norm(g: torch.Tensor) -> torch.Tensor:
    """[B] per-row L2 norms in g's dtype; differentiable (plain autograd).

    The zero-row gradient is 0: the formula is written so that autograd never
    divides by a zero norm.
    """
    scaled, m, s = _scaled_rows(g)
    safe_s = torch.where(s > 0, s, torch.ones_like(s))
    norm = torch.where(s > 0, m * safe_s.sqrt(), torch.zeros_like(s))
    return norm.to(g.dtype)


def _step(x: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    # The perturbation is a constant: gradients reach x only (identity).
    out = x.reshape(x.shape[0], -1).to(u.dtype) + scale * u.detach()
    return out.to(x.dtype).reshape(x.shape)


def normalized_step(x: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """x + scale * normalize(g)."""
    return _step(x, normalize(g), scale)


def dual_normalized_step(x: torch.Tensor, g: torch.Tensor, scale_a: float, scale_b: float):
    """(x + scale_a * normalize(g), x + scale_b * normalize(g))."""
    u = normalize(g)
    return _step(x, u, scale_a), _step(x, u, scale_b)


def fd_direction(x: torch.Tensor, g0: torch.Tensor, g1: torch.Tensor, eps: float) -> torch.Tensor:
    """x + eps * normalize(g1 - g0), the difference taken in the accumulation dtype (Eq. 15)."""
    diff = _rows(g1) - _rows(g0)
    return _step(x, normalize(diff), eps)


def fd_sphere_step(x: torch.Tensor, z: torch.Tensor, g0: torch.Tensor, g1: torch.Tensor, step: float,
                   eps: float) -> torch.Tensor:
    """x + eps * normalize(z + step * normalize(g1 - g0) - x), every difference in the accumulation dtype.

    Unlike the other steps nothing is a constant: plain autograd gives the true derivative in all
    four tensors, as the op's backward (a zero row's normalisation contributes nothing)."""
    moved = _rows(z) + step * normalize(_rows(g1) - _rows(g0)) - _rows(x)
    return (_rows(x) + eps * normalize(moved)).to(x.dtype).reshape(x.shape)


# =============================================================================
# Reference of the energy regulariser and the training objectives (SPEC.md §1)
# =============================================================================
#
# Plain autograd, written to be read next to the paper, not to be fast. Every
# extra pass (probe passes, x_max pass, adversarial and VAT passes) runs through
# ``torch.func.functional_call`` with the model's own parameters and *clones* of
# its buffers, so BatchNorm in train mode uses batch statistics but its running
# statistics are never touched; only the clean forward (a plain ``model(x)``)
# updates them. Randomness (dropout): the energy passes all start from the same
# RNG state, captured on entry (or handed in as ``rng_state``).

import math  # noqa: E402
from typing import Callable, Dict, Optional, Tuple  # noqa: E402

import torch.nn.functional as F  # noqa: E402

__all__ += [
    "default_xi",
    "ref_x_max",
    "ref_energy_reg",
    "ref_erm_loss",
    "ref_at_loss",
    "ref_vat_loss",
    "ref_ater_loss",
    "ref_vater_loss",
    "ref_uniform_start",
    "ref_pgd",
    "ref_pgd_at_loss",
    "ref_trades_loss",
    "ref_fgsm_rs_loss",
]


def default_xi(dtype: torch.dtype) -> float:
    """The SPEC's dtype rule for ``xi`` (and ``xi_vat``): 1e-6 fp64, 1e-3 fp32, 1e-2 fp16/bf16."""
    if dtype == torch.float64:
        return 1e-6
    if dtype == torch.float32:
        return 1e-3
    return 1e-2


def _check_positive(name: str, what: str, v: float) -> float:
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: {what} must be finite and > 0, got {v}")
    return v


# ------------------------------------------------------------------ RNG state
def _get_rng(device: torch.device):
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return (cpu, cuda)


def _set_rng(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


# ------------------------------------------------------------- model passes
def _forward_side(model: torch.nn.Module, x: torch.Tensor, *, params_differentiable: bool) -> torch.Tensor:
    """``model(x)`` in the model's current mode without touching its buffers.

    Buffers are cloned, so a train-mode BatchNorm normalises with the batch
    statistics and updates only the clones. With ``params_differentiable`` the
    output is differentiable with respect to the model's parameters; without,
    the parameters enter as constants (input-gradient passes).
    """
    tensors: Dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        tensors[n] = p if params_differentiable else p.detach()
    for n, b in model.named_buffers():
        tensors[n] = b.clone()
    return torch.func.functional_call(model, tensors, (x,))


def _loss_fn(loss_fn: Optional[Callable]) -> Callable:
    return F.cross_entropy if loss_fn is None else loss_fn


def _input_grad(model, x, y, loss_fn, *, create_graph: bool = False):
    """``grad_x sum_i L(x_i, y_i)`` at a detached copy of ``x`` (and that copy)."""
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(_forward_side(model, xr, params_differentiable=False), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xr, create_graph=create_graph)
    return g, xr


def _move(x: torch.Tensor, direction: torch.Tensor, scale: float, clamp) -> torch.Tensor:
    """``x + scale * normalize(direction)`` (then clamped to ``clamp``), a constant."""
    out = _step(x.detach(), normalize(direction), scale)
    if clamp is not None:
        out = out.clamp(clamp[0], clamp[1])
    return out.detach()


def ref_x_max(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 2.0,
    xi: Optional[float] = None,
    loss_fn: Optional[Callable] = None,
    grad_x: Optional[torch.Tensor] = None,
    direction: str = "fd",
    clamp: Optional[Tuple[float, float]] = None,
    rng_state=None,
) -> torch.Tensor:
    """The point where the input-gradient norm grows fastest (Eq. 14, 15).

    ``g = grad_x sum_i L(x_i, y_i)`` (pass 1; or ``grad_x`` if given), then

    * ``direction="fd"`` (Eq. 15, probe normalised as SPEC §1 pins it)::

          probe = x + xi * normalize(g)
          g2    = grad_x sum_i L(probe_i, y_i)                      (pass 2)
          x_max = x + eps * normalize(g2 - g)

    * ``direction="hvp"`` (Eq. 14, exact)::

          x_max = x + eps * normalize(H(x) normalize(g)),  H(x) v = grad_x (g . v)

    ``clamp=(lo, hi)`` clamps ``probe`` and ``x_max``. ``x_max`` is detached.
    Every pass starts from the same RNG state (``rng_state``, else the state on
    entry); on return the RNG is left as after pass 1 (as on entry if there is
    no pass 1 here). Buffers and mode are untouched.
    """
    loss_fn = _loss_fn(loss_fn)
    eps = _check_positive("ref_x_max", "eps", eps)
    xi = _check_positive("ref_x_max", "xi", default_xi(x.dtype) if xi is None else xi)
    if direction not in ("fd", "hvp"):
        raise ValueError(f"ref_x_max: direction must be 'fd' or 'hvp', got {direction!r}")
    dev = x.device
    start = _get_rng(dev) if rng_state is None else rng_state
    _set_rng(start, dev)

    if direction == "hvp":
        g, xr = _input_grad(model, x, y, loss_fn, create_graph=True)
        after_pass1 = _get_rng(dev)
        u = g if grad_x is None else grad_x  # g := grad_x when the caller gives it
        v = normalize(u).reshape(g.shape).to(g.dtype).detach()
        (hv,) = torch.autograd.grad((g * v).sum(), xr)
        out = _move(x, hv, eps, clamp)
        _set_rng(after_pass1, dev)
        return out

    if grad_x is None:
        g, _ = _input_grad(model, x, y, loss_fn)
        after_pass1 = _get_rng(dev)
    else:
        g = grad_x.detach()
        after_pass1 = _get_rng(dev) if rng_state is None else None
    probe = _move(x, g, xi, clamp)
    _set_rng(start, dev)
    g2, _ = _input_grad(model, probe, y, loss_fn)
    diff = _rows(g2) - _rows(g)  # in the accumulation dtype
    out = _move(x, diff, eps, clamp)
    if after_pass1 is not None:
        _set_rng(after_pass1, dev)
    return out


def ref_energy_reg(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 2.0,
    xi: Optional[float] = None,
    loss_fn: Optional[Callable] = None,
    grad_x: Optional[torch.Tensor] = None,
    direction: str = "fd",
    penalty: str = "exact",
    clamp: Optional[Tuple[float, float]] = None,
    reduction: str = "mean",
    fd_h: float = 1e-2,
    rng_state=None,
) -> torch.Tensor:
    """The energy regulariser of Eq. 11: ``mean_i ||grad_x L(x_max_i, y_i)||``.

    ``x_max`` as in :func:`ref_x_max` (a constant). Then

    * ``penalty="exact"``: ``||grad_x L(x_max_i)||`` with ``create_graph=True``
      (double backpropagation), differentiable with respect to the parameters.
    * ``penalty="fd"``: ``(L(x_max_i + h v_i) - L(x_max_i)) / h`` with
      ``v = normalize(grad_x L(x_max))`` detached and ``h = fd_h``.

    ``reduction``: ``"mean"`` / ``"sum"`` over the batch, or ``"none"`` ([B]).
    The penalty passes start from the same RNG state as the probe passes.
    """
    if penalty not in ("exact", "fd"):
        raise ValueError(f"ref_energy_reg: penalty must be 'exact' or 'fd', got {penalty!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"ref_energy_reg: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    fd_h = _check_positive("ref_energy_reg", "fd_h", fd_h)
    loss_fn = _loss_fn(loss_fn)
    dev = x.device
    start = _get_rng(dev) if rng_state is None else rng_state
    _set_rng(start, dev)
    xm = ref_x_max(model, x, y, eps=eps, xi=xi, loss_fn=loss_fn, grad_x=grad_x, direction=direction,
                   clamp=clamp, rng_state=start)
    after = _get_rng(dev)

    with torch.enable_grad():
        if penalty == "exact":
            xr = xm.detach().requires_grad_(True)
            _set_rng(start, dev)
            loss = loss_fn(_forward_side(model, xr, params_differentiable=True), y, reduction="sum")
            (gm,) = torch.autograd.grad(loss, xr, create_graph=True)
            per_sample = row_norm(gm)
        else:
            xr = xm.detach().requires_grad_(True)
            _set_rng(start, dev)
            l0 = loss_fn(_forward_side(model, xr, params_differentiable=True), y, reduction="none")
            (gm,) = torch.autograd.grad(l0.sum(), xr, retain_graph=True)
            x_h = _step(xm, normalize(gm), fd_h).detach()  # x_max + h * v, v a constant
            _set_rng(start, dev)
            l1 = loss_fn(_forward_side(model, x_h, params_differentiable=True), y, reduction="none")
            per_sample = (l1 - l0) / fd_h
    _set_rng(after, dev)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


# -------------------------------------------------------------- objectives
# RNG rule of the objectives: every extra pass (adversarial, VAT, probe,
# penalty) starts from the RNG state of the clean forward, so a dropout model
# sees the clean forward's masks in all of them; on return the RNG is left as
# after the clean forward.

def ref_erm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ERM: ``mean_i CE(f(x_i), y_i)`` (the clean forward updates BatchNorm's running statistics)."""
    return F.cross_entropy(model(x), y)


def _clean_pass(model, x, y_or_none):
    """The clean forward (the only pass that updates buffers): ``(logits, start, after)``
    with ``start``/``after`` the RNG states before and after it."""
    start = _get_rng(x.device)
    xr = x.detach().requires_grad_(True)
    logits = model(xr)
    after = _get_rng(x.device)
    return xr, logits, start, after


def _side(model, x, rng, *, params_differentiable: bool) -> torch.Tensor:
    """An extra pass from RNG state ``rng`` (see :func:`_forward_side`)."""
    _set_rng(rng, x.device)
    return _forward_side(model, x, params_differentiable=params_differentiable)


def ref_at_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps_adv: float = 2.0) -> torch.Tensor:
    """AT (L2, one step): ``L(x) + L(x_adv)``, ``x_adv = x + eps_adv * normalize(grad_x sum_i L(x_i))``.

    Both terms are batch means of the cross-entropy; ``x_adv`` is a constant.
    """
    xr, logits, start, after = _clean_pass(model, x, y)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr, retain_graph=True)
    x_adv = _move(x, g, eps_adv, None)
    adv = _side(model, x_adv, start, params_differentiable=True)
    _set_rng(after, x.device)
    return F.cross_entropy(logits, y) + F.cross_entropy(adv, y)


def _kl_batchmean(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``mean_i KL(p_i || q_i) = mean_i sum_c p_ic (log p_ic - log q_ic)``."""
    logp = F.log_softmax(p_logits, dim=1)
    logq = F.log_softmax(q_logits, dim=1)
    return (logp.exp() * (logp - logq)).sum(dim=1).mean()


def _vat_term(model, x, p_logits, rng, *, eps_vat, xi_vat, ip, d0):
    """``KL(p(x) || p(x + r_vat))`` with ``p(x)`` (``p_logits``) a constant.

    Power iteration (Miyato et al.): ``d <- grad_r KL(p(x) || p(x + r))`` at
    ``r = xi_vat * normalize(d)``, ``ip`` times from ``d = d0``; then
    ``r_vat = eps_vat * normalize(d)``. Every pass starts from RNG state ``rng``.
    """
    p_logits = p_logits.detach()
    d = d0
    for _ in range(ip):
        r = (xi_vat * normalize(d)).reshape(x.shape).to(x.dtype).requires_grad_(True)
        with torch.enable_grad():
            kl = _kl_batchmean(p_logits, _side(model, x.detach() + r, rng, params_differentiable=False))
            (d,) = torch.autograd.grad(kl, r)
    x_vat = _move(x, d, eps_vat, None)
    return _kl_batchmean(p_logits, _side(model, x_vat, rng, params_differentiable=True))


def ref_vat_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    eps_vat: float = 2.0,
    xi_vat: Optional[float] = None,
    ip: int = 1,
    d0: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The VAT term alone: ``mean_i KL(p(x_i) || p(x_i + r_vat_i))``, ``p(x)`` detached.

    ``d0`` is the power iteration's start (``torch.randn_like(x)``, drawn first,
    if not given). ``xi_vat=None`` follows :func:`default_xi`. A term to add to
    a loss that has its own clean forward: ``p(x)`` comes from an extra pass,
    so the BatchNorm buffers are not updated here.
    """
    xi_vat = default_xi(x.dtype) if xi_vat is None else float(xi_vat)
    if d0 is None:
        d0 = torch.randn_like(x)
    start = _get_rng(x.device)
    with torch.no_grad():
        p_logits = _side(model, x, start, params_differentiable=False)
    after = _get_rng(x.device)
    out = _vat_term(model, x, p_logits, start, eps_vat=eps_vat, xi_vat=xi_vat, ip=ip, d0=d0)
    _set_rng(after, x.device)
    return out


def ref_ater_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps_adv: float = 2.0,
    eps: float = 2.0,
    lam: float = 0.1,
    xi: Optional[float] = None,
) -> torch.Tensor:
    """ATER, Eq. 11 / Algorithm 1: ``L(x) + L(x_adv) + lam * energy_reg(x)``.

    One pass-1 gradient ``g`` (from the clean forward) serves
    ``x_adv = x + eps_adv * normalize(g)`` and the probe ``x + xi * normalize(g)``.
    """
    xr, logits, start, after = _clean_pass(model, x, y)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr, retain_graph=True)
    x_adv = _move(x, g, eps_adv, None)
    adv = _side(model, x_adv, start, params_differentiable=True)
    reg = ref_energy_reg(model, x, y, eps=eps, xi=xi, grad_x=g, rng_state=start)
    _set_rng(after, x.device)
    return F.cross_entropy(logits, y) + F.cross_entropy(adv, y) + lam * reg


def ref_vater_loss(
    model: torch.nn.Module,
    x_l: torch.Tensor,
    y_l: torch.Tensor,
    x_ul: torch.Tensor,
    *,
    eps_vat: float = 2.0,
    eps: float = 2.0,
    lam: float = 0.1,
    xi: Optional[float] = None,
    ip: int = 1,
    xi_vat: Optional[float] = None,
    d0: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """VATER, Eq. 12 / Algorithm 2 (semi-supervised)::

        L(x_l) + VAT(x_l ∪ x_ul) + lam * energy_reg(x_l ∪ x_ul, y_l ∪ argmax p(x_ul))

    One clean forward of the joint batch ``x = cat(x_l, x_ul)`` gives the
    labelled loss, the VAT target ``p(x)`` (detached), the pseudo-labels of the
    unlabelled rows (argmax at the clean input, detached) and pass 1's ``g``.
    ``xi`` is the energy probe distance, ``xi_vat`` the power-iteration step
    (both ``None``: the dtype rule). ``d0`` defaults to ``torch.randn_like(x)``,
    drawn first.
    """
    x = torch.cat([x_l, x_ul], dim=0)
    if d0 is None:
        d0 = torch.randn_like(x)
    n_l = x_l.shape[0]
    xi_vat = default_xi(x.dtype) if xi_vat is None else float(xi_vat)
    xr, logits, start, after = _clean_pass(model, x, None)
    y = torch.cat([y_l, logits[n_l:].detach().argmax(dim=1)], dim=0)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xr, retain_graph=True)
    sup = F.cross_entropy(logits[:n_l], y_l)
    vat = _vat_term(model, x, logits, start, eps_vat=eps_vat, xi_vat=xi_vat, ip=ip, d0=d0)
    reg = ref_energy_reg(model, x, y, eps=eps, xi=xi, grad_x=g, rng_state=start)
    _set_rng(after, x.device)
    return sup + vat + lam * reg


# ------------------------------------------------------------------ baselines
def _ref_project(xa: torch.Tensor, x0: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The nearest point of the ball ``||x - x0|| <= eps`` (L2: rescale the offset; L-inf: clip it)."""
    if norm == "linf":
        return torch.max(torch.min(xa, x0 + eps), x0 - eps)
    delta = (xa - x0).reshape(x0.shape[0], -1)
    n = delta.double().norm(dim=1)
    factor = torch.where(n > eps, eps / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))
    return x0 + (delta * factor.to(delta.dtype)[:, None]).reshape(x0.shape)


def ref_uniform_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A uniform random point of each sample's ball, drawn in the order ater_ext.attacks draws it
    (L2: a Gaussian direction, then the radius ``eps * U^(1/D)`` in fp64; L-inf: ``U[-eps, eps]``)."""
    if norm == "linf":
        return x + eps * (2 * torch.rand(x.shape, dtype=x.dtype, generator=generator) - 1)
    d = x[0].numel()
    gauss = torch.randn(x.shape, dtype=x.dtype, generator=generator)
    u = torch.rand(x.shape[0], dtype=torch.float64, generator=generator)
    radius = (eps * u.pow(1.0 / d)).to(x.dtype)
    return x + radius.reshape((-1,) + (1,) * (x.dim() - 1)) * normalize(gauss).to(x.dtype).reshape(x.shape)


def ref_pgd(model, x, target, eps: float, *, norm: str, steps: int, step_size: float, loss, start=None,
            clamp=None) -> torch.Tensor:
    """Projected gradient ascent of ``sum_i loss(f(x'_i), target_i)`` in the ``norm`` ball around ``x``
    (from ``start``, projected; else from ``x``), in the model's mode with cloned buffers. L2 steps move
    ``step_size`` along the normalised gradient, L-inf steps along its sign; each is projected onto the
    ball, then clipped to ``clamp``. Returns a constant."""
    x0 = x.detach()
    xa = x0.clone() if start is None else _ref_project(start.detach(), x0, eps, norm)
    if clamp is not None:
        xa = xa.clamp(clamp[0], clamp[1])
    for _ in range(steps):
        xr = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            value = loss(_forward_side(model, xr, params_differentiable=False), target).sum()
            (g,) = torch.autograd.grad(value, xr)
        if norm == "l2":
            xa = xa + step_size * normalize(g).to(xa.dtype).reshape(xa.shape)
        else:
            xa = xa + step_size * g.sign()
        xa = _ref_project(xa, x0, eps, norm)
        if clamp is not None:
            xa = xa.clamp(clamp[0], clamp[1])
    return xa.detach()


def _ce_per_sample(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def ref_pgd_at_loss(model, x, y, *, eps: float = 2.0, norm: str = "l2", steps: int = 10,
                    step_size: Optional[float] = None, clean_weight: float = 0.0, start=None) -> torch.Tensor:
    """Madry et al.'s PGD-AT: ``L(x_adv)`` (or ``c L(x) + (1 - c) L(x_adv)`` from one forward of
    ``cat(x, x_adv)``), ``x_adv`` by :func:`ref_pgd` on the cross-entropy from ``start``."""
    step = 2.5 * eps / steps if step_size is None else step_size
    x_adv = ref_pgd(model, x, y, eps, norm=norm, steps=steps, step_size=step, loss=_ce_per_sample, start=start)
    if clean_weight == 0:
        return F.cross_entropy(model(x_adv), y)
    logits = model(torch.cat([x.detach(), x_adv]))
    n = x.shape[0]
    return clean_weight * F.cross_entropy(logits[:n], y) + (1 - clean_weight) * F.cross_entropy(logits[n:], y)


def ref_trades_loss(model, x, y, *, eps: float = 2.0, norm: str = "l2", beta: float = 6.0, steps: int = 10,
                    step_size: Optional[float] = None, noise: torch.Tensor) -> torch.Tensor:
    """TRADES: ``CE(f(x), y) + beta * mean_i KL(p(x_i) || p(x_adv_i))``; ``x_adv`` ascends the KL (``p(x)``
    fixed) from ``x + 0.001 * noise``; in the loss the KL is differentiable through both sides."""
    logits = model(x)
    p_fixed = F.softmax(logits.detach(), dim=1)

    def kl_fixed(q_logits, p):
        return (p * (p.log() - F.log_softmax(q_logits, dim=1))).sum(dim=1)

    step = 2.5 * eps / steps if step_size is None else step_size
    x_adv = ref_pgd(model, x, p_fixed, eps, norm=norm, steps=steps, step_size=step, loss=kl_fixed,
                    start=x.detach() + 0.001 * noise)
    adv_logits = _forward_side(model, x_adv, params_differentiable=True)
    return F.cross_entropy(logits, y) + beta * _kl_batchmean(logits, adv_logits)


def ref_fgsm_rs_loss(model, x, y, *, eps: float, alpha: Optional[float] = None, start: torch.Tensor) -> torch.Tensor:
    """Wong et al.'s FGSM with random start: one sign step of ``alpha`` (default ``1.25 eps``) from
    ``start``, projected onto the L-inf box; then ``L(x_adv)``."""
    alpha = 1.25 * eps if alpha is None else alpha
    x_adv = ref_pgd(model, x, y, eps, norm="linf", steps=1, step_size=alpha, loss=_ce_per_sample, start=start)
    return F.cross_entropy(model(x_adv), y)


# ------------------------------------------------------------- x_max ascent
__all__ += ["ref_x_max_steps", "ref_grad_norms"]


def ref_grad_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Optional[Callable] = None
                   ) -> torch.Tensor:
    """``[B]``: ``||grad_x L(x_i, y_i)||`` of the summed loss (buffers untouched), in the accumulation dtype."""
    g, _ = _input_grad(model, x, y, _loss_fn(loss_fn))
    return _rows(g).norm(dim=1)


def ref_x_max_steps(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 2.0,
    xi: Optional[float] = None,
    loss_fn: Optional[Callable] = None,
    direction: str = "fd",
    steps: int = 1,
    step: Optional[float] = None,
    clamp: Optional[Tuple[float, float]] = None,
) -> torch.Tensor:
    """``x_max`` with ``steps`` steps of ascent (models without random layers)::

        z_1 = ref_x_max(...)                                   (the one-step point)
        for t = 1 .. k-1:
            g_t = grad_x L(z_t),   u_t = normalize(g_t)
            d_t = grad_x L(z_t + xi u_t) - g_t        (fd)     or  H(z_t) u_t  (hvp)
            z_{t+1} = x + eps * normalize(z_t + step * normalize(d_t) - x)   (back onto the sphere)
        x_max_i = the z_t (t = 1 .. k) of largest ||grad_x L(z_t)_i||   (first one on ties)

    ``step`` defaults to ``eps``. ``clamp`` clamps every probe and point.
    """
    loss_fn = _loss_fn(loss_fn)
    xi = default_xi(x.dtype) if xi is None else float(xi)
    step = float(eps) if step is None else float(step)
    z = ref_x_max(model, x, y, eps=eps, xi=xi, loss_fn=loss_fn, direction=direction, clamp=clamp)
    best, best_norm = None, None
    for t in range(steps):
        more = t < steps - 1
        gz, zr = _input_grad(model, z, y, loss_fn, create_graph=more and direction == "hvp")
        norm = _rows(gz.detach()).norm(dim=1)
        if best is None:
            best, best_norm = z, norm
        else:
            better = norm > best_norm
            best = torch.where(better.reshape((-1,) + (1,) * (z.dim() - 1)), z, best)
            best_norm = torch.where(better, norm, best_norm)
        if not more:
            break
        if direction == "hvp":
            u = normalize(gz.detach()).reshape(gz.shape).to(gz.dtype)
            (d,) = torch.autograd.grad((gz * u).sum(), zr)
            d = _rows(d)
        else:
            g2, _ = _input_grad(model, _move(z, gz, xi, clamp), y, loss_fn)
            d = _rows(g2) - _rows(gz.detach())
        moved = _step(z, normalize(d), step)
        z = _move(x, (_rows(moved) - _rows(x)).reshape(x.shape), eps, clamp)
    return best.detach()
