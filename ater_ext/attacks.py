"""White-box evasion attacks for the robustness evaluation (the paper's Fig. 2).

Three plain functions, all ``attack(model, x, y, eps, ...) -> x_adv``:

* :func:`fgsm`: one L-inf step, ``x_adv = clip(x + eps * sign(g))``.
* :func:`pgd_l2`: projected gradient ascent in the L2 ball ``||x_adv - x|| <= eps``.
* :func:`pgd_linf`: projected gradient ascent in the L-inf ball ``|x_adv - x| <= eps``.

Here ``g = grad_x sum_i L(model(x)_i, y_i)``; norms are per sample over every
non-batch dimension, and ``clip`` is the data range ``clamp=(lo, hi)``
(``None``: no range). Keep the inputs in that range and put any input
normalisation inside the model (the most common slip with attack libraries).

What every attack guarantees:

* Input gradients only (``torch.autograd.grad`` with respect to the attacked
  point, through :class:`ater_ext.passes.ExtraPasses`): parameters' ``.grad``
  is never touched, no weight-gradient work is done, BatchNorm running
  statistics are never written, and the attack works under an outer
  ``torch.no_grad()``.
* The model runs in eval mode (``eval_mode=True``, as in ART, torchattacks and
  foolbox); every submodule's train/eval flag is restored on return, also
  when an exception is raised. With ``eval_mode=False`` the model's current
  modes are used, and dropout draws one mask that every step of the attack
  sees (the RNG state at the call).
* A zero input gradient moves nothing: such a sample stays where it is (no
  NaN). TRADES's L2 attack falls back to random noise there; these attacks
  do not, so a flat loss (e.g. a saturated softmax in fp32) is reported as
  robust rather than hidden behind a random perturbation.
* ``eps == 0`` returns a copy of ``x``. The result is detached, in ``x``'s
  dtype and memory format (channels_last stays channels_last).
* ``output=`` says where the logits are in the model's output (a key, an
  index or a callable; :func:`ater_ext.outputs.resolve_output`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops
from .checks import check_batch, check_clamp, check_nonnegative, check_positive, resolve_loss_fn
from .energy import clamp_to
from .outputs import OutputSpec
from .passes import ExtraPasses, LossFn, in_memory_format

__all__ = ["fgsm", "pgd_l2", "pgd_linf"]

Clamp = Optional[Tuple[float, float]]


# ------------------------------------------------------------------- helpers
def _check_steps(op: str, steps: int, step_size: Optional[float], eps: float, dtype: torch.dtype
                 ) -> Tuple[int, float]:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"ater_ext.{op}: steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)
    if step_size is None:
        return steps, 2.5 * eps / steps  # Madry et al.
    return steps, check_positive(op, "step_size", step_size, dtype)


@contextlib.contextmanager
def model_mode(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Run the body with ``model`` in eval mode (if ``eval_mode``), then put
    every submodule's ``training`` flag back as it was, also on an exception."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def _uniform_l2_ball(x: Tensor, eps: float, generator: Optional[torch.Generator]) -> Tensor:
    """``[B, ...]`` points drawn uniformly in the L2 balls ``B(x_i, eps)``.

    Direction: a normalised Gaussian; radius: ``eps * U ** (1 / D)`` with ``D``
    the per-sample dimension (the radius of a uniform point has density ~ r^(D-1)).
    """
    dim = x[0].numel() if x.shape[0] else 1
    gauss = torch.randn(x.shape, dtype=x.dtype, device=_draw_device(x, generator), generator=generator).to(x.device)
    u = torch.rand(x.shape[0], dtype=torch.float64, device=gauss.device, generator=generator).to(x.device)
    radius = (eps * u.pow(1.0 / dim)).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    return x + radius * ops.normalized_step(torch.zeros_like(x), gauss, 1.0)


def _draw_device(x: Tensor, generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else x.device


def _prepare(op: str, x: Tensor, y: Tensor, eps: float) -> float:
    check_batch(op, x, y)
    return check_nonnegative(op, "eps", eps, x.dtype)


def _input_grad(passes: ExtraPasses, x_adv: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """``grad_x sum_i L(x_adv_i, y_i)`` in ``x_adv``'s dtype (input gradient only)."""
    g, _ = passes.input_grad(x_adv, y, loss_fn)
    return g.to(x_adv.dtype)


def _project_l2(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Per sample, ``x + delta * min(1, eps / ||delta||)`` with ``delta = x_adv - x``."""
    delta = x_adv - x
    norm = ops.row_norm(delta).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    factor = torch.where(norm > eps, eps / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))
    return x + delta * factor.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def _project_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.clamp(x_adv, min=x - eps, max=x + eps)


# ---------------------------------------------------------------- public API
def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, clamp: Clamp = (0.0, 1.0),
         loss_fn: Optional[LossFn] = None, eval_mode: bool = True, output: OutputSpec = None) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015), an L-inf attack.

    ``x_adv = clip(x + eps * sign(grad_x sum_i L(x_i, y_i)))``, with ``clip``
    the data range ``clamp`` (``None``: none).

    Args:
        model: maps ``x`` to logits (a DDP / DataParallel wrapper is unwrapped).
        x, y: the batch ``[B, ...]`` and its labels ``[B]``.
        eps: L-inf radius, finite and >= 0 (0 returns a copy of ``x``).
        clamp: data range ``(lo, hi)`` or ``None``.
        loss_fn: ``loss_fn(logits, y, reduction=...)``; ``F.cross_entropy`` by default.
        eval_mode: run the model in eval mode (restored afterwards).
        output: where the logits are in the model's output (``None``: it is the logits).

    Coordinates with a zero gradient do not move (``sign(0) = 0``).
    """
    op = "fgsm"
    eps = _prepare(op, x, y, eps)
    clamp = check_clamp(op, clamp)
    if eps == 0:
        return x.detach().clone()
    loss_fn = resolve_loss_fn(loss_fn, op)
    x0 = x.detach()
    with model_mode(model, eval_mode), torch.enable_grad(), ExtraPasses(model, x0, output=output, op=op) as passes:
        g = _input_grad(passes, x0, y, loss_fn)
    return in_memory_format(clamp_to(x0 + eps * g.sign(), clamp).detach(), passes.memory_format)


def _pgd(op: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int,
         step_size: Optional[float], clamp: Clamp, start, update, loss_fn: Optional[LossFn],
         eval_mode: bool, output: OutputSpec) -> Tensor:
    """The PGD loop shared by the L2 and L-inf attacks: ``start(x0, eps)`` draws a
    random start (``None``: start at ``x``), ``update(x_adv, g, x0, eps, step)``
    takes one projected step; the data-range clip follows each."""
    eps = _prepare(op, x, y, eps)
    clamp = check_clamp(op, clamp)
    steps, step_size = _check_steps(op, steps, step_size, eps, x.dtype)
    if eps == 0:
        return x.detach().clone()
    loss_fn = resolve_loss_fn(loss_fn, op)
    x0 = x.detach()
    x_adv = clamp_to(start(x0, eps), clamp) if start is not None else x0.clone()
    with model_mode(model, eval_mode), torch.enable_grad(), ExtraPasses(model, x0, output=output, op=op) as passes:
        for _ in range(steps):
            g = _input_grad(passes, x_adv, y, loss_fn)
            with torch.no_grad():
                x_adv = clamp_to(update(x_adv, g, x0, eps, step_size), clamp)
    return in_memory_format(x_adv.detach(), passes.memory_format)


def _start(op: str, random_start, x_init: Optional[Tensor], project):
    """The start rule of a PGD attack: a random draw, a given point (projected), or None (x itself)."""
    if x_init is None:
        return random_start
    if random_start is not None:
        raise ValueError(f"ater_ext.{op}: random_start and x_init exclude each other")

    def given(x0: Tensor, eps: float) -> Tensor:
        if x_init.shape != x0.shape:
            raise ValueError(f"ater_ext.{op}: x_init must have x's shape, got {list(x_init.shape)} "
                             f"and {list(x0.shape)}")
        return project(x_init.detach().to(x0.dtype), x0, eps)
    return given


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int = 10,
           step_size: Optional[float] = None, clamp: Clamp = (0.0, 1.0), random_start: bool = False,
           loss_fn: Optional[LossFn] = None, eval_mode: bool = True,
           generator: Optional[torch.Generator] = None, output: OutputSpec = None,
           x_init: Optional[Tensor] = None) -> Tensor:
    """Projected gradient descent on the loss in the L2 ball (Madry et al. 2018).

    Start at ``x`` (or, with ``random_start``, at a point drawn uniformly in the
    ball, clipped), then ``steps`` times::

        g     = grad_x sum_i L(x_adv_i, y_i)
        x_adv = x_adv + step_size * g / ||g||                       (ops.normalized_step)
        x_adv = x + (x_adv - x) * min(1, eps / ||x_adv - x||)       (onto B(x, eps))
        x_adv = clip(x_adv)                                         (data range)

    Clipping after the projection keeps the point in the ball (for ``x`` inside
    the range it only moves coordinates towards ``x``). A sample whose gradient
    is zero does not move. ``step_size`` defaults to ``2.5 * eps / steps``.
    ``generator`` draws the random start (the global RNG when ``None``);
    ``x_init``: start there instead (projected onto the ball, clipped; e.g.
    TRADES's ``x + 0.001 * randn``), exclusive with ``random_start``. Other
    arguments as in :func:`fgsm`.
    """
    def start(x0: Tensor, eps: float) -> Tensor:
        return _uniform_l2_ball(x0, eps, generator)

    def update(x_adv: Tensor, g: Tensor, x0: Tensor, eps: float, step: float) -> Tensor:
        return _project_l2(ops.normalized_step(x_adv, g, step), x0, eps)

    return _pgd("pgd_l2", model, x, y, eps, steps=steps, step_size=step_size, clamp=clamp,
                start=_start("pgd_l2", start if random_start else None, x_init, _project_l2), update=update,
                loss_fn=loss_fn, eval_mode=eval_mode, output=output)


def pgd_linf(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int = 10,
             step_size: Optional[float] = None, clamp: Clamp = (0.0, 1.0), random_start: bool = False,
             loss_fn: Optional[LossFn] = None, eval_mode: bool = True,
             generator: Optional[torch.Generator] = None, output: OutputSpec = None,
             x_init: Optional[Tensor] = None) -> Tensor:
    """Projected gradient descent on the loss in the L-inf ball (Madry et al. 2018).

    Start at ``x`` (or, with ``random_start``, at ``x + U[-eps, eps]`` per
    coordinate, clipped), then ``steps`` times::

        g     = grad_x sum_i L(x_adv_i, y_i)
        x_adv = x_adv + step_size * sign(g)
        x_adv = min(max(x_adv, x - eps), x + eps)                   (onto the box)
        x_adv = clip(x_adv)                                         (data range)

    Coordinates with a zero gradient do not move. ``step_size`` defaults to
    ``2.5 * eps / steps``. Other arguments as in :func:`pgd_l2`.
    """
    def start(x0: Tensor, eps: float) -> Tensor:
        noise = torch.rand(x0.shape, dtype=x0.dtype, device=_draw_device(x0, generator), generator=generator)
        return x0 + eps * (2 * noise.to(x0.device) - 1)

    def update(x_adv: Tensor, g: Tensor, x0: Tensor, eps: float, step: float) -> Tensor:
        return _project_linf(x_adv + step * g.sign(), x0, eps)

    return _pgd("pgd_linf", model, x, y, eps, steps=steps, step_size=step_size, clamp=clamp,
                start=_start("pgd_linf", start if random_start else None, x_init, _project_linf), update=update,
                loss_fn=loss_fn, eval_mode=eval_mode, output=output)
