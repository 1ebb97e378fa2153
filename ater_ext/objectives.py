"""The training objectives of the paper: ERM, AT, VAT, ATER (Eq. 11) and VATER (Eq. 12),
and the baselines a user would run instead: multi-step PGD adversarial training
(Madry et al.), TRADES (Zhang et al. 2019) and FGSM with a random start (Wong et al. 2020).

Each returns ``(loss, stats)``: ``loss`` is a scalar to call ``backward()`` on,
``stats`` a dict of floats for logging (of detached 0-dim tensors while a CUDA
graph is captured, where reading a value would synchronise). None of them calls ``zero_grad``,
``backward`` or ``step``. Only the clean forward updates BatchNorm running
statistics; every other pass goes through :class:`ater_ext.passes.ExtraPasses`.
Losses are batch means of ``loss_fn`` (cross-entropy by default).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attacks, ops
from .checks import check_clamp, check_grad_mode, check_lam, check_nonnegative
from .energy import (DIRECTIONS, accumulation_dtype, check_batch, check_choice, check_positive, check_steps,
                     check_trainable, clamp_to, default_xi, grad_scale_of, penalty_value, resolve_loss_fn,
                     x_max_from_grad, xmax_stats)
from .gradient_bank import GradientBank, banked_term, owned_gradients
from .outputs import OutputSpec, resolve_output
from .passes import ExtraPasses, LossFn, is_capturing
from .randomness import RandomTape

__all__ = ["erm_loss", "at_loss", "vat_loss", "ater_loss", "vater_loss", "pgd_at_loss", "trades_loss", "fgsm_rs_loss"]

Stats = Dict[str, Union[float, Tensor]]


def detached_stats(**terms: Tensor) -> Stats:
    """Detached floats, read back in one device sync; during CUDA graph capture
    (no sync allowed) the detached tensors, which each replay refreshes."""
    detached = [t.detach().float().reshape(()) for t in terms.values()]
    if is_capturing(detached[0].device):
        return dict(zip(terms, detached))
    return dict(zip(terms, torch.stack(detached).tolist()))


class _CleanForward:
    """The clean forward (the only pass that updates BatchNorm statistics), with
    ``x`` as a leaf so that pass 1's input gradient can come from its graph. Its
    random draws (dropout masks) are recorded on the passes' tape, so that every
    extra pass replays them."""

    def __init__(self, op: str, model: nn.Module, x: Tensor, output: OutputSpec):
        check_grad_mode(op, x)
        self.model = model
        self.tape = RandomTape()
        self.x_leaf = x.detach().requires_grad_(True)
        with self.tape.run():
            raw = model(self.x_leaf)
        self.logits = resolve_output(output, op=op)(raw)

    def passes(self, x: Tensor, **kwargs) -> ExtraPasses:
        """The extra passes, replaying this forward's random draws."""
        return ExtraPasses(self.model, x, tape=self.tape, **kwargs)

    def input_grad_and_bank(self, passes: ExtraPasses, per_sample_loss: Tensor, y: Tensor,
                            loss_fn: LossFn, bank: bool = True) -> Tuple[Tensor, Optional[GradientBank]]:
        """``(g, bank)`` with ``g = grad_x sum_i L(x_i, y_i)``, traversing the clean
        graph once: one backward gives ``g`` and the parameter gradients of the
        mean loss, which start the bank (the clean graph is freed here, and no
        gradient is computed for ``x``). Under autocast (GradScaler must scale the
        low-precision backward) ``g`` comes from an fp32 pass and the bank is None,
        as with ``bank=False``: the terms then keep their graphs for the caller's backward."""
        if passes.work_dtype is not None or not bank:
            return self.input_grad(passes, per_sample_loss, y, loss_fn), None
        params = [p for p in self.model.parameters() if p.requires_grad]
        # g in the list too: x + p as the first op gives p the same gradient tensor as x
        g, *param_grads = owned_gradients(torch.autograd.grad(per_sample_loss.sum(), [self.x_leaf, *params],
                                                              allow_unused=True))
        return g, GradientBank(params, param_grads, divide_by=per_sample_loss.numel())

    def input_grad(self, passes: ExtraPasses, per_sample_loss: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        """``grad_x sum_i L(x_i, y_i)`` from this forward's graph (kept for the
        caller's backward). Under autocast that graph is low precision, so a
        separate fp32 pass is run instead (SPEC: probe passes in fp32)."""
        if passes.work_dtype is not None:
            return passes.input_grad(self.x_leaf, y, loss_fn)[0]
        (g,) = torch.autograd.grad(per_sample_loss.sum(), self.x_leaf, retain_graph=True)
        return g


def _energy_from_grad(passes: ExtraPasses, x: Tensor, y: Tensor, g: Tensor, probe: Tensor, loss_fn: LossFn, *,
                      eps: float, xi: float, direction: str, steps: int, clamp, scaler) -> Tuple[Tensor, Tensor]:
    """``(energy_reg, xmax_grad_ratio)`` given pass 1's gradient and the probe:
    ``x_max`` (Eq. 15 by default: pass 2, one fused launch), the exact penalty,
    and the quality ratio ``mean ||grad_x L(x_max)|| / mean ||g||`` from the
    norms already computed (:func:`ater_ext.energy.xmax_stats`)."""
    xm = x_max_from_grad(passes, x, y, g, probe, loss_fn, eps=eps, xi=xi, direction=direction, steps=steps,
                         clamp=clamp)
    energy, norms = penalty_value(passes, xm, y, loss_fn, kind="exact", fd_h=1e-2, reduction="mean",
                                  grad_scale=grad_scale_of(scaler))
    return energy, xmax_stats(g, norms)["xmax_grad_ratio"]


def _check_maximiser(op: str, direction: str, steps: int) -> Tuple[str, int]:
    check_choice(op, "direction", direction, DIRECTIONS)
    return direction, check_steps(op, steps)


def _vat_term(passes: ExtraPasses, x: Tensor, clean_logits: Tensor, d: Tensor, *, eps_vat: float,
              xi_vat: float, ip: int) -> Tensor:
    """``KL(p(x) || p(x + r_vat))`` (batch mean), ``p(x)`` detached, ``r_vat`` from
    ``ip`` power iterations starting at direction ``d`` (Miyato et al.)."""
    acc = accumulation_dtype(clean_logits.dtype)
    log_p = F.log_softmax(clean_logits.detach().to(acc), dim=1)
    x0 = x.detach()
    for _ in range(ip):
        x_r = ops.normalized_step(x0, d, xi_vat).requires_grad_(True)
        with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            log_q = F.log_softmax(passes.forward(x_r, detach_params=True).to(acc), dim=1)
            kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
            (d,) = torch.autograd.grad(kl, x_r)
    x_vat = ops.normalized_step(x0, d, eps_vat)
    log_q = F.log_softmax(passes.forward(x_vat, detach_params=False).to(acc), dim=1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def check_ip(op: str, ip: int) -> int:
    if isinstance(ip, bool) or int(ip) != ip or ip < 1:
        raise ValueError(f"ater_ext.{op}: ip (power iterations) must be an integer >= 1, got {ip!r}")
    return int(ip)


def erm_loss(model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: Optional[LossFn] = None,
             output: OutputSpec = None) -> Tuple[Tensor, Stats]:
    """Empirical risk: ``L(x)``. ``output``: where the logits are in the model's
    output (:func:`ater_ext.outputs.resolve_output`), as in every objective."""
    op = "erm_loss"
    check_batch(op, x, y)
    loss = resolve_loss_fn(loss_fn, op)(resolve_output(output, op=op)(model(x)), y, reduction="mean")
    return loss, detached_stats(loss=loss, ce=loss)


def at_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps_adv: float = 2.0, loss_fn: Optional[LossFn] = None,
            clamp=None, output: OutputSpec = None, bank_gradients: bool = True) -> Tuple[Tensor, Stats]:
    """One-step L2 adversarial training: ``L(x) + L(x_adv)``,
    ``x_adv = x + eps_adv * normalize(grad_x L(x))`` (a constant).

    ``bank_gradients`` (default): the terms' parameter gradients are computed
    here and handed over in the caller's one backward (their graphs are freed
    early); that loss is not twice differentiable, and ``backward(create_graph=True)``
    through it raises. ``bank_gradients=False`` keeps plain graphs (higher-order
    gradients, several backwards with ``retain_graph``)."""
    op = "at_loss"
    check_batch(op, x, y)
    eps_adv = check_positive(op, "eps_adv", eps_adv, x.dtype)
    clamp = check_clamp(op, clamp)
    loss_fn = resolve_loss_fn(loss_fn, op)
    clean = _CleanForward(op, model, x, output)
    per_sample = loss_fn(clean.logits, y, reduction="none")
    ce = per_sample.mean()
    with clean.passes(x, output=output, op=op) as passes:
        g, bank = clean.input_grad_and_bank(passes, per_sample, y, loss_fn, bank_gradients)
        x_adv = clamp_to(ops.normalized_step(x.detach().to(g.dtype), g, eps_adv), clamp).to(x.dtype)
        adv = banked_term(bank, loss_fn(passes.forward(x_adv, detach_params=False), y, reduction="mean"))
    loss = ce + adv if bank is None else bank.loss(ce + adv)
    return loss, detached_stats(loss=loss, ce=ce, adv=adv)


def vat_loss(model: nn.Module, x: Tensor, *, eps_vat: float = 2.0, xi_vat: Optional[float] = None,
             ip: int = 1, output: OutputSpec = None) -> Tuple[Tensor, Stats]:
    """The VAT term alone: ``KL(p(x) || p(x + r_vat))`` with ``p(x)`` detached and
    ``r_vat = eps_vat * normalize(d)``, ``d`` from ``ip`` power iterations of
    ``grad_r KL(p(x) || p(x + r))`` at ``r = xi_vat * normalize(d)``, starting from
    ``d = randn_like(x)`` (this function's first random draw). ``p(x)`` comes
    from an extra pass, so BatchNorm buffers are not updated."""
    op = "vat_loss"
    check_batch(op, x)
    eps_vat = check_positive(op, "eps_vat", eps_vat, x.dtype)
    xi_vat = check_positive(op, "xi_vat", default_xi(x.dtype) if xi_vat is None else xi_vat, x.dtype)
    ip = check_ip(op, ip)
    d = torch.randn_like(x)
    with ExtraPasses(model, x, output=output, op=op) as passes:
        with torch.no_grad():
            clean_logits = passes.forward(x.detach(), detach_params=True)
        vat = _vat_term(passes, x, clean_logits, d, eps_vat=eps_vat, xi_vat=xi_vat, ip=ip)
    return vat, detached_stats(loss=vat, vat=vat)


def ater_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps_adv: float = 2.0, eps: float = 2.0,
              lam: float = 0.1, xi: Optional[float] = None, loss_fn: Optional[LossFn] = None,
              clamp=None, scaler=None, compile: Union[bool, str] = False, output: OutputSpec = None,
              bank_gradients: bool = True, direction: str = "fd", steps: int = 1) -> Tuple[Tensor, Stats]:
    """ATER, Eq. 11 / Algorithm 1: ``L(x) + L(x_adv) + lam * energy_reg``.

    One clean forward; its graph gives the pass-1 gradient ``g`` (no separate
    forward), from which one fused launch makes both ``x_adv = x + eps_adv *
    normalize(g)`` and the probe ``x + xi * normalize(g)``; pass 2 at the probe
    and one fused launch give ``x_max`` (Eq. 15); the penalty is
    ``mean_i ||grad_x L(x_max_i)||`` by double backpropagation. ``lam`` >= 0.
    ``scaler``: the GradScaler of an fp16 AMP loop (see :func:`ater_ext.energy_reg`).
    ``compile``: run pass 2 through ``torch.compile`` (see :func:`ater_ext.x_max`).
    ``output``: where the logits are in the model's output. ``bank_gradients``
    as in :func:`at_loss` (``False`` for a twice-differentiable loss).
    ``direction`` / ``steps``: the maximiser of ``x_max``, as in :func:`ater_ext.x_max`
    (the default ``"fd"``, ``1`` is the paper's algorithm above).

    ``stats``: ``loss``, ``ce``, ``adv``, ``energy`` and ``xmax_grad_ratio``
    ``= mean_i ||grad_x L(x_max_i)|| / mean_i ||grad_x L(x_i)||``, free (both
    norms are computed anyway): about 1 means ``x_max`` is no better than a
    random point of the sphere (``ater-train`` logs it as ``train_xmax_grad_ratio``).
    """
    op = "ater_loss"
    check_batch(op, x, y)
    eps_adv = check_positive(op, "eps_adv", eps_adv, x.dtype)
    eps = check_positive(op, "eps", eps, x.dtype)
    lam = check_lam(op, lam)
    xi = check_positive(op, "xi", default_xi(x.dtype) if xi is None else xi, x.dtype)
    clamp = check_clamp(op, clamp)
    direction, steps = _check_maximiser(op, direction, steps)
    check_trainable(op, model)
    loss_fn = resolve_loss_fn(loss_fn, op)
    clean = _CleanForward(op, model, x, output)
    per_sample = loss_fn(clean.logits, y, reduction="none")
    ce = per_sample.mean()
    with clean.passes(x, compile=compile, output=output, op=op) as passes:
        g, bank = clean.input_grad_and_bank(passes, per_sample, y, loss_fn, bank_gradients)
        x_adv, probe = ops.dual_normalized_step(x.detach().to(g.dtype), g, eps_adv, xi)
        adv = banked_term(bank, loss_fn(passes.forward(clamp_to(x_adv, clamp).to(x.dtype), detach_params=False),
                                        y, reduction="mean"))
        energy, ratio = _energy_from_grad(passes, x, y, g, clamp_to(probe, clamp), loss_fn, eps=eps, xi=xi,
                                          direction=direction, steps=steps, clamp=clamp, scaler=scaler)
    # The penalty's gradients are not banked: autograd.grad would skip the input
    # gradient at x_max (one first-layer matmul, ~3 % of an MLP step) but holds
    # all of them at once: the MNIST MLP's step then peaked 4 % above the naive
    # step's memory, against equal when the caller's backward accumulates them.
    # The caller's backward skips that matmul with backward_into_parameters.
    head = ce + adv if bank is None else bank.loss(ce + adv)
    loss = head + lam * energy
    return loss, detached_stats(loss=loss, ce=ce, adv=adv, energy=energy, xmax_grad_ratio=ratio)


def vater_loss(model: nn.Module, x_l: Tensor, y_l: Tensor, x_ul: Tensor, *, eps_vat: float = 2.0,
               eps: float = 2.0, lam: float = 0.1, xi: Optional[float] = None, ip: int = 1,
               xi_vat: Optional[float] = None, loss_fn: Optional[LossFn] = None,
               clamp=None, scaler=None, compile: Union[bool, str] = False,
               output: OutputSpec = None, direction: str = "fd", steps: int = 1) -> Tuple[Tensor, Stats]:
    """VATER, Eq. 12 / Algorithm 2 (semi-supervised):
    ``L(x_l) + VAT(x_l ∪ x_ul) + lam * energy_reg(x_l ∪ x_ul)``.

    One clean forward on the union ``x = cat(x_l, x_ul)`` (so BatchNorm
    statistics are updated once, with all of it). Unlabelled rows take the
    pseudo-label ``argmax p(x)`` at the clean input, detached, for the energy
    term (the paper's ``grad_x f`` is undefined for a vector output; a soft
    self-target would have zero gradient at ``x``). VAT's start direction is
    ``randn_like(x)``, this function's first random draw. ``scaler``,
    ``compile``, ``output``, ``direction`` and ``steps`` as in :func:`ater_loss`,
    and its ``xmax_grad_ratio`` in the stats (over the union batch). The loss is
    twice differentiable (no banked gradients).
    """
    op = "vater_loss"
    check_batch(op, x_l, y_l)
    check_batch(op, x_ul)
    if x_l.shape[1:] != x_ul.shape[1:] or x_l.dtype != x_ul.dtype or x_l.device != x_ul.device:
        raise ValueError(f"ater_ext.{op}: x_l and x_ul must share sample shape, dtype and device, got "
                         f"x_l {list(x_l.shape)} {x_l.dtype} {x_l.device} and "
                         f"x_ul {list(x_ul.shape)} {x_ul.dtype} {x_ul.device}")
    eps_vat = check_positive(op, "eps_vat", eps_vat, x_l.dtype)
    eps = check_positive(op, "eps", eps, x_l.dtype)
    xi = check_positive(op, "xi", default_xi(x_l.dtype) if xi is None else xi, x_l.dtype)
    xi_vat = check_positive(op, "xi_vat", default_xi(x_l.dtype) if xi_vat is None else xi_vat, x_l.dtype)
    ip = check_ip(op, ip)
    lam = check_lam(op, lam)
    clamp = check_clamp(op, clamp)
    direction, steps = _check_maximiser(op, direction, steps)
    check_trainable(op, model)
    loss_fn = resolve_loss_fn(loss_fn, op)
    n_l = x_l.shape[0]
    x = torch.cat([x_l, x_ul])
    d = torch.randn_like(x)
    clean = _CleanForward(op, model, x, output)
    y = torch.cat([y_l, clean.logits[n_l:].detach().argmax(dim=1).to(y_l.dtype)])
    per_sample = loss_fn(clean.logits, y, reduction="none")
    with clean.passes(x, compile=compile, output=output, op=op) as passes:
        vat = _vat_term(passes, x, clean.logits, d, eps_vat=eps_vat, xi_vat=xi_vat, ip=ip)
        g = clean.input_grad(passes, per_sample, y, loss_fn)
        probe = clamp_to(ops.normalized_step(x.detach().to(g.dtype), g, xi), clamp)
        energy, ratio = _energy_from_grad(passes, x, y, g, probe, loss_fn, eps=eps, xi=xi, direction=direction,
                                          steps=steps, clamp=clamp, scaler=scaler)
    ce = per_sample[:n_l].mean()
    loss = ce + vat + lam * energy
    return loss, detached_stats(loss=loss, ce=ce, vat=vat, energy=energy, xmax_grad_ratio=ratio)


# ---------------------------------------------------------------- baselines
# The methods a researcher would run instead of ATER (issue 14), in the same
# harness: their attacks are ater_ext.attacks' PGD loop run through the extra
# passes (input gradients only, BatchNorm buffers untouched, the model's own
# train/eval mode, one dropout mask per attack), and only the training
# forward updates BatchNorm statistics.
BASELINE_NORMS = ("l2", "linf")


def check_norm(op: str, norm: str) -> str:
    if norm not in BASELINE_NORMS:
        raise ValueError(f"ater_ext.{op}: norm must be one of {list(BASELINE_NORMS)}, got {norm!r}")
    return norm


def _attack(norm: str):
    return attacks.pgd_l2 if norm == "l2" else attacks.pgd_linf


def pgd_at_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 2.0, norm: str = "l2", steps: int = 10,
                step_size: Optional[float] = None, random_start: bool = True, clean_weight: float = 0.0,
                loss_fn: Optional[LossFn] = None, clamp=None, output: OutputSpec = None,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Stats]:
    """Multi-step PGD adversarial training (Madry et al. 2018): ``L(x_adv)``.

    ``x_adv``: ``steps`` steps of PGD (:func:`ater_ext.attacks.pgd_l2` /
    ``pgd_linf``) from a uniform random start in the ball (``random_start``),
    step size ``step_size`` (default ``2.5 * eps / steps``, Madry et al.'s rule),
    in the model's current mode; a constant for the update. With
    ``clean_weight = c > 0`` the loss is ``c L(x) + (1 - c) L(x_adv)`` (the
    clean-loss mix), from one training forward on ``cat(x, x_adv)``.

    Cost: ``steps`` attack passes (forward + input-gradient backward each), then
    one training forward and backward (on twice the batch with the mix).
    ``generator`` draws the random start (the global RNG when ``None``).
    """
    op = "pgd_at_loss"
    check_batch(op, x, y)
    eps = check_positive(op, "eps", eps, x.dtype)
    norm, steps = check_norm(op, norm), check_steps(op, steps)
    clean_weight = check_nonnegative(op, "clean_weight", clean_weight)
    if clean_weight > 1:
        raise ValueError(f"ater_ext.{op}: clean_weight must be in [0, 1], got {clean_weight}")
    clamp = check_clamp(op, clamp)
    loss_fn = resolve_loss_fn(loss_fn, op)
    x_adv = _attack(norm)(model, x, y, eps, steps=steps, step_size=step_size, clamp=clamp, random_start=random_start,
                          loss_fn=loss_fn, eval_mode=False, generator=generator, output=output)
    logits_of = resolve_output(output, op=op)
    if clean_weight == 0:
        adv = loss_fn(logits_of(model(x_adv)), y, reduction="mean")
        return adv, detached_stats(loss=adv, adv=adv)
    logits = logits_of(model(torch.cat([x.detach(), x_adv])))
    ce = loss_fn(logits[:x.shape[0]], y, reduction="mean")
    adv = loss_fn(logits[x.shape[0]:], y, reduction="mean")
    loss = clean_weight * ce + (1 - clean_weight) * adv
    return loss, detached_stats(loss=loss, ce=ce, adv=adv)


def _kl_to(log_p: Tensor):
    """A loss_fn ``(logits, target, reduction) -> KL(p || softmax(logits))`` with ``p = exp(log_p)``
    fixed (the ``target`` argument is ``log_p`` itself, passed through the attack as its "labels")."""
    def kl(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        acc = accumulation_dtype(logits.dtype)
        log_q = F.log_softmax(logits.to(acc), dim=1)
        per_sample = (target.exp() * (target - log_q)).sum(dim=1)
        return {"none": per_sample, "sum": per_sample.sum(), "mean": per_sample.mean()}[reduction]
    return kl


def trades_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 2.0, norm: str = "l2", beta: float = 6.0,
                steps: int = 10, step_size: Optional[float] = None, loss_fn: Optional[LossFn] = None, clamp=None,
                output: OutputSpec = None, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Stats]:
    """TRADES (Zhang et al. 2019): ``L(x) + beta * mean_i KL(p(x_i) || p(x_adv_i))``.

    ``x_adv``: ``steps`` steps of PGD ascending ``KL(p(x) || p(x'))`` (``p(x)``
    fixed) from ``x + 0.001 * N(0, I)`` (TRADES's start; ``generator`` draws it),
    step size default ``2.5 * eps / steps``. In the loss the KL is differentiable
    through both ``p(x)`` and ``p(x_adv)``, as in TRADES. Defaults: TRADES's
    ``beta = 6`` and 10 steps; its paper uses L-inf radii (MNIST 0.3, CIFAR-10
    8/255), this project's L2 default is the paper's 2.0. One clean forward
    (the one that updates BatchNorm); the attack runs in the model's current
    mode (TRADES's code switches to eval mode for it).

    Cost: one clean forward, ``steps`` attack passes, the ``x_adv`` forward, and
    the backward through both forwards.
    """
    op = "trades_loss"
    check_batch(op, x, y)
    eps = check_positive(op, "eps", eps, x.dtype)
    beta = check_positive(op, "beta", beta)
    norm, steps = check_norm(op, norm), check_steps(op, steps)
    clamp = check_clamp(op, clamp)
    loss_fn = resolve_loss_fn(loss_fn, op)
    clean = _CleanForward(op, model, x, output)
    acc = accumulation_dtype(clean.logits.dtype)
    log_p_fixed = F.log_softmax(clean.logits.detach().to(acc), dim=1)
    noise = torch.randn(x.shape, dtype=x.dtype, device=generator.device if generator is not None else x.device,
                        generator=generator).to(x.device)
    x_adv = _attack(norm)(model, x, log_p_fixed, eps, steps=steps, step_size=step_size, clamp=clamp,
                          loss_fn=_kl_to(log_p_fixed), eval_mode=False, output=output,
                          x_init=x.detach() + 0.001 * noise)
    ce = loss_fn(clean.logits, y, reduction="mean")
    with clean.passes(x, output=output, op=op) as passes:
        log_q = F.log_softmax(passes.forward(x_adv, detach_params=False).to(acc), dim=1)
    log_p = F.log_softmax(clean.logits.to(acc), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    loss = ce + beta * kl
    return loss, detached_stats(loss=loss, ce=ce, kl=kl)


def fgsm_rs_loss(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 0.3, alpha: Optional[float] = None,
                 loss_fn: Optional[LossFn] = None, clamp=None, output: OutputSpec = None,
                 generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Stats]:
    """"Fast" adversarial training, FGSM from a random start (Wong et al. 2020): ``L(x_adv)``.

    ``x_adv = proj(x + delta + alpha * sign(grad_x L(x + delta)))`` with
    ``delta ~ U[-eps, eps]`` per coordinate and ``alpha = 1.25 * eps`` (their
    rule), projected onto the L-inf box and clipped to ``clamp``: one step of
    :func:`ater_ext.attacks.pgd_linf` with a random start. L-inf only, as the
    method is. Cost: one attack pass, then one training forward and backward.
    """
    op = "fgsm_rs_loss"
    check_batch(op, x, y)
    eps = check_positive(op, "eps", eps, x.dtype)
    alpha = 1.25 * eps if alpha is None else check_positive(op, "alpha", alpha, x.dtype)
    clamp = check_clamp(op, clamp)
    loss_fn = resolve_loss_fn(loss_fn, op)
    x_adv = _attack("linf")(model, x, y, eps, steps=1, step_size=alpha, clamp=clamp, random_start=True,
                            loss_fn=loss_fn, eval_mode=False, generator=generator, output=output)
    adv = loss_fn(resolve_output(output, op=op)(model(x_adv)), y, reduction="mean")
    return adv, detached_stats(loss=adv, adv=adv)
