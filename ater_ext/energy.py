"""``x_max`` and ``energy_reg``: the energy regulariser of ATER and VATER.

With ``L`` the per-sample loss and norms taken per sample over all non-batch
dimensions (SPEC section 1):

* pass 1: ``g = grad_x sum_i L(x_i, y_i)``
* probe:  ``x + xi * g / ||g||``  (the paper writes ``x + xi * g``; normalising
  first keeps the probe at distance ``xi`` whatever the size of ``g``)
* pass 2: ``g2 = grad_x sum_i L(probe_i, y_i)``
* Eq. 15: ``x_max = x + eps * (g2 - g) / ||g2 - g||``  (``xi`` cancels), a
  constant for the parameter update
* penalty: ``energy_reg = mean_i ||grad_x L(x_max_i, y_i)||`` by double
  backpropagation, differentiable with respect to the parameters.

``steps=k > 1`` continues from that point with projected ascent of
``||grad_x L||`` on the sphere (:func:`ascend_x_max`). The probe, the
direction and the steps are the fused ops of :mod:`ater_ext.ops`
(one launch each for the whole batch); the passes run through
:class:`ater_ext.passes.ExtraPasses` (BatchNorm buffers untouched, same dropout
masks, no weight-gradient work).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops
from .checks import (check_batch, check_choice, check_clamp, check_positive, check_trainable,  # noqa: F401
                     resolve_loss_fn)
from .outputs import OutputSpec
from .passes import ExtraPasses, LossFn, RngState, has_active_dropout, in_memory_format, unwrap_model

__all__ = ["default_xi", "x_max", "energy_reg", "xmax_stats"]

DIRECTIONS = ("fd", "hvp")
PENALTIES = ("exact", "fd")
REDUCTIONS = ("mean", "sum", "none")


def default_xi(dtype: torch.dtype) -> float:
    """The probe distance ``xi`` for inputs of ``dtype``.

    The paper's 1e-6 is exact only in fp64: in fp32 the difference ``g2 - g``
    drowns in rounding (median cosine to the exact HVP 0.15 for a tanh MLP,
    0.007 for a ReLU MLP, at initialisation), while 1e-3 gives >= 0.999 there.
    On trained ReLU models no ``xi`` makes the one-step FD direction the HVP's
    (the probe crosses ReLU kinks; see :func:`x_max`). fp16/bf16 inputs (a half
    model without autocast; under autocast the passes run in fp32) get 1e-2.
    """
    if dtype == torch.float64:
        return 1e-6
    if dtype == torch.float32:
        return 1e-3
    return 1e-2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 tensors, fp32 otherwise: where losses are subtracted or softmaxed."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def clamp_to(t: Tensor, clamp: Optional[Tuple[float, float]]) -> Tensor:
    return t if clamp is None else t.clamp(clamp[0], clamp[1])


def check_rng_for_grad_x(op: str, model: nn.Module, grad_x: Optional[Tensor], rng_state: Optional[RngState]
                         ) -> None:
    """``grad_x`` of a model with active dropout needs the state its forward drew the masks from."""
    if grad_x is not None and rng_state is None and has_active_dropout(unwrap_model(model)):
        raise ValueError(
            f"ater_ext.{op}: grad_x= was given for a model with active dropout but rng_state= was not, so the "
            f"extra passes would draw other dropout masks than the forward that gave grad_x (the direction "
            f"g2 - g would then measure the mask change); capture rng_state = ater_ext.capture_rng_state(x.device) "
            f"just before that forward and pass rng_state=rng_state (or drop grad_x=)")


# ------------------------------------------------------------------ the steps
def check_steps(op: str, steps: int) -> int:
    """``steps`` as an int; ValueError naming ``op`` unless it is an integer >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real) or int(steps) != steps or steps < 1:
        raise ValueError(f"ater_ext.{op}: steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def fd_x_max(passes: ExtraPasses, x: Tensor, y: Tensor, g: Tensor, probe: Tensor, loss_fn: LossFn,
             eps: float, clamp) -> Tensor:
    """Eq. 15 from the pass-1 gradient ``g`` and the (clamped) probe: pass 2, one fused launch."""
    g2, _ = passes.input_grad(probe, y, loss_fn)
    return clamp_to(ops.fd_direction(x.detach().to(g.dtype), g, g2, eps), clamp).to(x.dtype)


def hvp_x_max(passes: ExtraPasses, x: Tensor, y: Tensor, grad_x: Optional[Tensor], loss_fn: LossFn,
              eps: float, clamp) -> Tuple[Tensor, Tensor]:
    """``(x + eps * normalize(H(x) normalize(g)), g)`` with the exact Hessian-vector product
    (``g = grad_x`` when given, else computed here; returned detached)."""
    u_source, hv = hessian_vector(passes, x, y, loss_fn, grad_x)
    return clamp_to(ops.normalized_step(x.detach().to(hv.dtype), hv, eps), clamp).to(x.dtype), u_source


def hessian_vector(passes: ExtraPasses, z: Tensor, y: Tensor, loss_fn: LossFn,
                   u_source: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(u_source, H(z) normalize(u_source))`` by double backpropagation, ``u_source``
    defaulting to ``grad_x L(z)`` (returned detached, in the passes' dtype)."""
    g, z_leaf = passes.input_grad(z, y, loss_fn, create_graph=True)
    u_source = g.detach() if u_source is None else u_source.detach().to(g.dtype)
    u = ops.normalized_step(torch.zeros_like(u_source), u_source, 1.0)
    with torch.enable_grad():
        (hv,) = torch.autograd.grad(g, z_leaf, grad_outputs=u)
    return u_source, hv


# Step length of the ascent steps after the first, as a fraction of eps (see ascend_x_max). Chosen on the
# ERM- and ATER-trained MNIST MLPs (fractions of 0.25 .. 2.0 tried, k = 2, 4, 8): 1.0 reached the most on the
# ATER-trained model at k = 2 and 4 and was within a few per cent of the best on the ERM-trained one.
ASCENT_STEP = 1.0


def _ascent_step(passes: ExtraPasses, x: Tensor, z: Tensor, y: Tensor, loss_fn: LossFn, *, eps: float, xi: float,
                 direction: str, clamp, step: float) -> Tuple[Tensor, Tensor]:
    """From ``z`` on the sphere: ``(||grad_x L(z)|| per row, the next point on the sphere)``.

    The next point is ``z + step * normalize(d)`` pulled back onto the sphere,
    ``x + eps * normalize(. - x)``, with ``d = H(z) normalize(grad_x L(z))``: by the
    finite difference ``grad_x L(z + xi u) - grad_x L(z)`` (two first-order passes,
    the fused probe launch and the fused step-and-projection launch
    :func:`ater_ext.ops.fd_sphere_step`; ``direction="fd"``) or the exact product
    (one double-backprop pass; ``"hvp"``).
    """
    if direction == "hvp":
        gz, hv = hessian_vector(passes, z, y, loss_fn)
        moved = ops.normalized_step(z.detach().to(hv.dtype), hv, step)
        x0 = x.detach().to(moved.dtype)
        nxt = ops.normalized_step(x0, moved - x0, eps)
    else:
        gz, _ = passes.input_grad(z, y, loss_fn)
        zw = z.detach().to(gz.dtype)
        g2, _ = passes.input_grad(clamp_to(ops.normalized_step(zw, gz, xi), clamp), y, loss_fn)
        nxt = ops.fd_sphere_step(x.detach().to(gz.dtype), zw, gz, g2, step, eps)
    return ops.row_norm(gz), clamp_to(nxt, clamp).to(x.dtype)


def ascend_x_max(passes: ExtraPasses, x: Tensor, y: Tensor, first: Tensor, loss_fn: LossFn, *, eps: float,
                 xi: float, direction: str, clamp, steps: int, step: Optional[float] = None) -> Tensor:
    """Projected ascent of ``||grad_x L||`` on the sphere of ``B(x, eps)``, from ``first``.

    ``first`` is the one-step point (Eq. 15 or its exact twin), the whole of
    ``steps=1``, returned as it is. With ``steps = k > 1``, ``k - 1`` steps of
    length ``step`` (default ``ASCENT_STEP * eps``) follow (:func:`_ascent_step`),
    each projected back onto the sphere (then clamped), and each row keeps the
    iterate where its gradient norm was largest (measured by the passes each step
    runs anyway, plus one first-order pass at the last iterate): so the norm
    reached never decreases with ``k`` (exactly so for models whose rows do not
    interact; batch-statistics BatchNorm couples them). Cost for ``k > 1``:
    ``2k - 1`` first-order passes beyond the one-step point's (fd), or ``k - 1``
    double-backprop passes and one first-order pass (hvp).
    """
    if steps == 1:
        return first
    step = ASCENT_STEP * eps if step is None else step
    z, best, best_norm = first, first, None
    for t in range(steps):
        if t < steps - 1:
            norm, nxt = _ascent_step(passes, x, z, y, loss_fn, eps=eps, xi=xi, direction=direction, clamp=clamp,
                                     step=step)
        else:
            norm, nxt = ops.row_norm(passes.input_grad(z, y, loss_fn)[0]), None
        if best_norm is None:
            best, best_norm = z, norm
        else:
            better = norm > best_norm
            best = torch.where(better.reshape((-1,) + (1,) * (z.dim() - 1)), z, best)
            best_norm = torch.where(better, norm, best_norm)
        z = nxt
    return best


def x_max_from_grad(passes: ExtraPasses, x: Tensor, y: Tensor, g: Tensor, probe: Optional[Tensor], loss_fn: LossFn,
                    *, eps: float, xi: float, direction: str, steps: int, clamp) -> Tensor:
    """``x_max`` given pass 1's gradient ``g`` (and, for ``direction="fd"``, the clamped probe)."""
    if direction == "hvp":
        first = hvp_x_max(passes, x, y, g, loss_fn, eps, clamp)[0]
    else:
        first = fd_x_max(passes, x, y, g, probe, loss_fn, eps, clamp)
    return ascend_x_max(passes, x, y, first, loss_fn, eps=eps, xi=xi, direction=direction, clamp=clamp, steps=steps)


def find_x_max(passes: ExtraPasses, x: Tensor, y: Tensor, *, eps: float, xi: float, loss_fn: LossFn,
               grad_x: Optional[Tensor], direction: str, clamp, steps: int = 1) -> Tuple[Tensor, Tensor]:
    """``(x_max, g)``: the point, and the clean input gradient it started from (detached)."""
    if direction == "hvp":
        first, g = hvp_x_max(passes, x, y, grad_x, loss_fn, eps, clamp)
        return ascend_x_max(passes, x, y, first, loss_fn, eps=eps, xi=xi, direction=direction, clamp=clamp,
                            steps=steps), g
    g = passes.input_grad(x, y, loss_fn)[0] if grad_x is None else grad_x.detach()
    if passes.work_dtype is not None:
        g = g.to(passes.work_dtype)
    probe = clamp_to(ops.normalized_step(x.detach().to(g.dtype), g, xi), clamp)
    return x_max_from_grad(passes, x, y, g, probe, loss_fn, eps=eps, xi=xi, direction=direction, steps=steps,
                           clamp=clamp), g


def xmax_stats(g: Tensor, norms_at_x_max: Tensor) -> dict:
    """The quality of ``x_max``, from norms the passes computed anyway (no extra pass).

    ``{"grad_norm": mean_i ||g_i||, "xmax_grad_norm": mean_i ||grad_x L(x_max_i)||,
    "xmax_grad_ratio": their ratio}`` as detached 0-dim tensors (fp64 for fp64
    inputs, else fp32). The ratio says how far ``x_max`` raised the input-gradient
    norm above the clean point's: a random point of the sphere gives about 1 on a
    trained model; near 1 means the maximiser found nothing. 1 when both norms
    are 0, inf when only the clean one is.
    """
    acc = accumulation_dtype(g.dtype)
    clean = ops.row_norm(g.detach()).to(acc).mean()
    reached = norms_at_x_max.detach().to(acc).mean()
    ratio = torch.where(clean > 0, reached / torch.where(clean > 0, clean, torch.ones_like(clean)),
                        torch.where(reached > 0, torch.full_like(clean, float("inf")), torch.ones_like(clean)))
    return {"grad_norm": clean, "xmax_grad_norm": reached, "xmax_grad_ratio": ratio}


def penalty_value(passes: ExtraPasses, x_max_: Tensor, y: Tensor, loss_fn: LossFn, *, kind: str, fd_h: float,
                  reduction: str, grad_scale: float = 1.0) -> Tuple[Tensor, Tensor]:
    """``(penalty, norms)``: ``||grad_x L(x_max_i, y_i)||`` per sample, reduced and
    differentiable w.r.t. the parameters, and the per-sample norms ``[B]`` detached
    (for :func:`xmax_stats`: the exact gradient norms, also with ``kind="fd"``).

    ``kind="exact"``: double backpropagation (``create_graph=True``); the loss is
    multiplied by ``grad_scale`` before the gradient and the gradient divided by
    it after, in fp32 (the GradScaler gradient-penalty recipe, so fp16 backward
    values don't underflow). ``kind="fd"``: ``(L(x_max + h v) - L(x_max)) / h``
    with ``v = normalize(grad_x L(x_max))`` detached: no double backward.
    """
    if kind == "exact":
        leaf = x_max_.detach().requires_grad_(True)
        loss = loss_fn(passes.penalty_forward(leaf), y, reduction="sum")
        (gx,) = torch.autograd.grad(loss * grad_scale if grad_scale != 1.0 else loss, leaf, create_graph=True)
        if gx.dtype in (torch.float16, torch.bfloat16):
            gx = gx.float()
        per_sample = ops.row_norm(gx)
        if grad_scale != 1.0:
            per_sample = per_sample / grad_scale
        norms = per_sample.detach()
    else:
        v, _ = passes.input_grad(x_max_, y, loss_fn)
        x_h = ops.normalized_step(x_max_.detach().to(v.dtype), v, fd_h).to(x_max_.dtype)
        loss_at = loss_fn(passes.penalty_forward(x_max_.detach()), y, reduction="none")
        loss_h = loss_fn(passes.penalty_forward(x_h), y, reduction="none")
        acc = accumulation_dtype(loss_at.dtype)
        per_sample = (loss_h.to(acc) - loss_at.to(acc)) / fd_h
        norms = ops.row_norm(v)
    if reduction == "mean":
        return per_sample.mean(), norms
    if reduction == "sum":
        return per_sample.sum(), norms
    return per_sample, norms


def _check_compiled(op: str, model: nn.Module, penalty_kind: str) -> None:
    module = unwrap_model(model)
    # torch.compile's OptimizedModule wraps the original as _orig_mod
    if penalty_kind == "exact" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
        raise RuntimeError(
            f"ater_ext.{op}: double backward through a torch.compile'd module is unsupported in PyTorch "
            f"(the exact penalty needs it); pass the uncompiled module (model._orig_mod) or use penalty='fd'")


def grad_scale_of(scaler) -> float:
    """The GradScaler's current scale (1.0 when there is none or it is disabled)."""
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


# ---------------------------------------------------------------- public API
def check_energy_settings(op: str, *, eps: float, xi: Optional[float], direction: str, clamp,
                          dtype: Optional[torch.dtype] = None, fd_h: Optional[float] = None,
                          penalty: Optional[str] = None, reduction: Optional[str] = None, steps: int = 1) -> dict:
    """The settings of ``x_max`` / ``energy_reg`` checked (``dtype``: the inputs', for
    the range checks and ``xi=None``); returns them normalised, as keywords."""
    settings = {"eps": check_positive(op, "eps", eps, dtype), "direction": direction,
                "clamp": check_clamp(op, clamp), "steps": check_steps(op, steps)}
    if xi is not None or dtype is not None:
        settings["xi"] = check_positive(op, "xi", default_xi(dtype) if xi is None else xi, dtype)
    else:
        settings["xi"] = None
    check_choice(op, "direction", direction, DIRECTIONS)
    if fd_h is not None:
        settings["fd_h"] = check_positive(op, "fd_h", fd_h, dtype)
    if penalty is not None:
        check_choice(op, "penalty", penalty, PENALTIES)
        settings["penalty"] = penalty
    if reduction is not None:
        check_choice(op, "reduction", reduction, REDUCTIONS)
        settings["reduction"] = reduction
    return settings


def x_max(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 2.0, xi: Optional[float] = None,
          loss_fn: Optional[LossFn] = None, grad_x: Optional[Tensor] = None, direction: str = "fd",
          clamp: Optional[Tuple[float, float]] = None, rng_state: Optional[RngState] = None,
          compile: Union[bool, str] = False, output: OutputSpec = None, steps: int = 1) -> Tensor:
    """A point of the sphere of ``B(x, eps)`` where the input-gradient norm is large (Eq. 15).

    ``x_max = x + eps * normalize(g2 - g)`` with ``g = grad_x sum_i L(x_i, y_i)``
    and ``g2`` the same gradient at the probe ``x + xi * normalize(g)``
    (``direction="fd"``, two passes, one fused launch each), or
    ``x + eps * normalize(H(x) normalize(g))`` with the exact Hessian-vector
    product (``direction="hvp"``). Detached: a constant for the parameter update,
    in ``x``'s dtype and memory format (channels_last stays channels_last).

    How close the two directions are depends on the model: at initialisation
    (smooth or ReLU MLPs, fp32, ``xi=1e-3``) their median cosine is >= 0.999; on
    trained ReLU/BatchNorm models the probe crosses ReLU kinks and the one-step
    FD direction can point elsewhere (median cosine 0.07 on the demo's
    ATER-trained MNIST MLP, the same in fp64). On images with a constant
    background (MNIST) a ReLU/max-pool CNN has exact ties at ``x`` that any
    probe breaks: on the trained LeNet the fp64 FD direction at ``xi=1e-6`` has
    median cosine -0.07 to the HVP's, and 1.0 once 1e-3 noise is added to the
    images. What matters is the gradient norm the point reaches:
    ``benchmarks/results/xmax-<machine>.md`` measures it against a strong
    reference for every maximiser here (on twelve trained models, MLP, LeNet,
    conv-large and ResNet-18, the default one-step FD reaches 11-58 % of it, a
    random point of the sphere 7-40 %, ``direction="hvp", steps=4`` 37-95 %).

    Args:
        model: any ``nn.Module`` (a DDP wrapper is unwrapped) whose output holds the logits.
        x, y: the batch ``[B, ...]`` and its labels ``[B]`` (whatever ``loss_fn`` takes).
        eps: radius of the ball, > 0 (and inside ``x``'s dtype range).
        xi: probe distance, > 0; ``None`` picks by dtype (:func:`default_xi`).
        loss_fn: ``loss_fn(logits, y, reduction=...)`` like ``F.cross_entropy`` (the default),
            or a ``torch.nn`` loss module; ``reduction="none"`` must give ``[B]``.
        grad_x: the clean input gradient ``grad_x sum_i L(x_i, y_i)`` when the
            caller already has it (skips pass 1); ``x``'s shape, dtype and device.
        direction: ``"fd"`` (finite difference) or ``"hvp"`` (exact).
        clamp: optional ``(lo, hi)`` data range for the probe and ``x_max``.
        steps: ``1`` (the default) is the paper's one-step point. ``k > 1``
            continues with ``k - 1`` steps of projected ascent of ``||grad_x L||``
            on the sphere, each along the ``direction`` (FD or exact HVP) at the
            current point, and keeps per row the iterate of largest gradient norm
            (:func:`ascend_x_max`): never off the ball, on its sphere (unless
            ``clamp`` cuts it), never a smaller norm than ``steps=1`` reached.
            fd costs ``2k - 1`` first-order passes more than ``steps=1``.
        rng_state: RNG state of the clean forward that produced ``grad_x``
            (:func:`ater_ext.capture_rng_state`), so that pass 2 sees its dropout
            masks. Required with ``grad_x`` when the model has active dropout
            layers (a ``ValueError`` says so); pass
            ``rng_state=ater_ext.capture_rng_state(x.device)`` taken now to ask
            for fresh masks explicitly.
        compile: run the first-order passes through ``torch.compile`` (``True``
            or a torch.compile mode, e.g. ``"reduce-overhead"`` for CUDA graphs);
            models with active dropout keep eager passes.
        output: where the logits are in the model's output: a key, an index or
            a callable (:func:`ater_ext.outputs.resolve_output`); ``None``: the
            output is the logits.

    BatchNorm buffers, ``.grad``, the train/eval mode and the global RNG state
    are left untouched when ``rng_state`` is given; without it the passes
    advance the global RNG as one forward would.
    """
    op = "x_max"
    check_batch(op, x, y, grad_x)
    settings = check_energy_settings(op, eps=eps, xi=xi, direction=direction, clamp=clamp, dtype=x.dtype,
                                     steps=steps)
    check_rng_for_grad_x(op, model, grad_x, rng_state)
    loss_fn = resolve_loss_fn(loss_fn, op)
    with torch.enable_grad(), ExtraPasses(model, x, rng_state, compile=compile, output=output, op=op) as passes:
        result, _ = find_x_max(passes, x, y, loss_fn=loss_fn, grad_x=grad_x, **settings)
    return in_memory_format(result.detach(), passes.memory_format)


def energy_reg(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 2.0, xi: Optional[float] = None,
               loss_fn: Optional[LossFn] = None, grad_x: Optional[Tensor] = None, direction: str = "fd",
               penalty: str = "exact", clamp: Optional[Tuple[float, float]] = None, reduction: str = "mean",
               fd_h: float = 1e-2, rng_state: Optional[RngState] = None, scaler=None,
               compile: Union[bool, str] = False, output: OutputSpec = None, steps: int = 1,
               return_stats: bool = False) -> Union[Tensor, Tuple[Tensor, dict]]:
    """The energy regulariser ``mean_i ||grad_x L(x_max_i, y_i)||`` (ATER's Eq. 11 second term).

    Drop it into any training loop::

        loss = F.cross_entropy(model(x), y) + lam * ater_ext.energy_reg(model, x, y)

    ``x_max`` is found as in :func:`x_max` (same arguments, ``steps=``, ``output=``
    and the ``grad_x`` / ``rng_state`` rule included). The penalty is
    differentiable with respect to the parameters: ``penalty="exact"`` by double
    backpropagation (the paper), ``penalty="fd"`` by the finite difference
    ``(L(x_max + h v) - L(x_max)) / h``, ``v = normalize(grad_x L(x_max))``,
    ``h = fd_h`` (no double backward: for models that lack it).
    ``reduction``: ``"mean"`` (scalar), ``"sum"`` or ``"none"`` (``[B]``).
    ``scaler``: the ``torch.amp.GradScaler`` of an fp16 AMP loop; its scale
    multiplies the loss inside the gradient (then divided out, in fp32), as in
    PyTorch's gradient-penalty AMP recipe. ``compile`` as in :func:`x_max`
    (the penalty's double backward always runs eagerly). The result is
    differentiable again (``backward(create_graph=True)`` gives the exact
    higher-order gradients).

    ``return_stats=True`` returns ``(value, stats)`` with ``stats`` the quality
    of ``x_max`` at no extra cost (:func:`xmax_stats`: ``grad_norm``,
    ``xmax_grad_norm`` and ``xmax_grad_ratio`` as detached 0-dim tensors)::

        reg, stats = ater_ext.energy_reg(model, x, y, return_stats=True)
        log(ratio=stats["xmax_grad_ratio"].item())  # ~1: x_max found no gradient growth

    Only the caller's backward touches ``.grad``; the extra passes compute input
    gradients only, never update BatchNorm buffers, see the same dropout masks,
    and run on the module inside a DDP wrapper. Raises under ``torch.no_grad()``.
    """
    op = "energy_reg"
    check_batch(op, x, y, grad_x)
    settings = check_energy_settings(op, eps=eps, xi=xi, direction=direction, clamp=clamp, dtype=x.dtype,
                                     fd_h=fd_h, penalty=penalty, reduction=reduction, steps=steps)
    check_trainable(op, model)
    _check_compiled(op, model, penalty)
    check_rng_for_grad_x(op, model, grad_x, rng_state)
    loss_fn = resolve_loss_fn(loss_fn, op)
    fd_h, penalty, reduction = settings.pop("fd_h"), settings.pop("penalty"), settings.pop("reduction")
    with ExtraPasses(model, x, rng_state, compile=compile, output=output, op=op) as passes:
        xm, g = find_x_max(passes, x, y, loss_fn=loss_fn, grad_x=grad_x, **settings)
        value, norms = penalty_value(passes, xm, y, loss_fn, kind=penalty, fd_h=fd_h, reduction=reduction,
                                     grad_scale=grad_scale_of(scaler))
    return (value, xmax_stats(g, norms)) if return_stats else value
