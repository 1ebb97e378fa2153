"""Monte-Carlo estimates of the paper's energies (Definitions 0.1 and 0.2).

For a sample ``x`` with label ``y``, per-sample loss ``L`` and ``D`` the
number of values in one sample:

* ``E_B / Vol(B) = (1 / Vol(B)) * int_{B(x, eps)} ||grad_x L(x', y)|| dV``:
  the mean input-gradient norm over the L2 ball. Estimated by the mean of
  ``||grad_x L(x', y)||`` over ``n_samples`` points ``x'`` drawn uniformly in
  the ball (direction a normalised Gaussian, radius ``eps * U ** (1 / D)``).
  Dividing by ``Vol(B)`` keeps the number finite and comparable across
  dimensions (the volume itself under- or overflows for MNIST-sized ``D``).
* ``E_eps = int_0^eps ||grad_x L(x + r * phi, y)|| dr`` along a direction
  ``phi`` uniform on the unit sphere. Estimated, averaged over directions too,
  by ``eps * mean ||grad_x L(x + r * phi, y)||`` over ``n_samples`` draws of
  ``(phi, r ~ U[0, eps])``.

Both are the energies whose upper bound ATER's ``energy_reg`` penalises, so a
trained model's values compare methods (ERM / AT / VAT / ATER / VATER).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from . import ops
from .attacks import model_mode
from .checks import check_batch, check_choice, check_positive, resolve_loss_fn
from .outputs import OutputSpec
from .passes import ExtraPasses, LossFn

__all__ = ["energy"]

REDUCTIONS = ("mean", "sum", "none")


def _private_generator(device: torch.device) -> torch.Generator:
    """A generator seeded from the global RNG (one draw), so that results are
    reproducible under ``torch.manual_seed`` while the passes (which replay the
    RNG state for their dropout masks) cannot replay the samples."""
    seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())
    return torch.Generator(device=device).manual_seed(seed)


def energy(model: nn.Module, x: Tensor, y: Tensor, eps: float, n_samples: int = 32, *,
           loss_fn: Optional[LossFn] = None, reduction: str = "mean", generator: Optional[torch.Generator] = None,
           eval_mode: bool = True, output: OutputSpec = None) -> Dict[str, Tensor]:
    """Monte-Carlo ``E_B / Vol(B)`` and ``E_eps`` of the loss around each sample.

    Args:
        model: maps ``x`` to logits (a DDP / DataParallel wrapper is unwrapped).
        x, y: the batch ``[B, ...]`` and its labels ``[B]``.
        eps: radius of the ball, finite and > 0.
        n_samples: draws per sample for each estimate, >= 1.
        loss_fn: ``loss_fn(logits, y, reduction=...)``; ``F.cross_entropy`` by default.
        reduction: ``"mean"`` (scalars: mean over the batch), ``"sum"`` or ``"none"`` (``[B]``).
        generator: draws the points (on its device); ``None`` seeds a private
            generator from the global RNG.
        eval_mode: run the model in eval mode (restored afterwards), so that
            BatchNorm uses its running statistics and the samples of a batch do
            not interact.
        output: where the logits are in the model's output (a key, an index or a
            callable; ``None``: it is the logits).

    Returns:
        ``{"E_B": ..., "E_eps": ...}``: detached tensors in fp32 (fp64 for fp64
        inputs), ``[B]`` for ``reduction="none"``, else scalars.

    Each draw is one batch of ``B`` perturbed points (one per sample), and its
    per-sample gradients are ``grad`` of ``loss_fn(..., reduction="sum")`` with
    respect to that batch: ``2 * n_samples`` input-gradient passes in all.
    Parameters' ``.grad``, BatchNorm buffers and every submodule's train/eval
    mode are left as they were (also on an exception); works under ``torch.no_grad()``.

    The standard error of each estimate is about ``std / sqrt(n_samples)`` per
    sample (``/ sqrt(B * n_samples)`` for the batch mean).
    """
    op = "energy"
    check_batch(op, x, y)
    eps = check_positive(op, "eps", eps, x.dtype)
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"ater_ext.{op}: n_samples must be an integer >= 1, got {n_samples!r}")
    n_samples = int(n_samples)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    loss_fn = resolve_loss_fn(loss_fn, op)

    x0 = x.detach()
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    gen = generator if generator is not None else _private_generator(x0.device)
    batch = x0.shape[0]
    dim = x0[0].numel() if batch else 1
    view = (-1,) + (1,) * (x0.dim() - 1)

    def direction() -> Tensor:  # [B, ...] unit rows, uniform on the sphere
        gauss = torch.randn(x0.shape, dtype=x0.dtype, device=gen.device, generator=gen).to(x0.device)
        return ops.normalized_step(torch.zeros_like(x0), gauss, 1.0)

    def radius_u() -> Tensor:  # [B] U[0, 1) in fp64
        return torch.rand(batch, dtype=torch.float64, device=gen.device, generator=gen).to(x0.device)

    sum_ball = torch.zeros(batch, dtype=acc, device=x0.device)
    sum_ray = torch.zeros(batch, dtype=acc, device=x0.device)
    with model_mode(model, eval_mode), torch.enable_grad(), ExtraPasses(model, x0, output=output, op=op) as passes:
        for _ in range(n_samples):
            # E_B / Vol: a uniform point of the ball, radius eps * U^(1/D).
            r_ball = (eps * radius_u().pow(1.0 / dim)).to(x0.dtype).reshape(view)
            g, _ = passes.input_grad(x0 + r_ball * direction(), y, loss_fn)
            sum_ball += ops.row_norm(g).to(acc)
            # E_eps: a point on a random ray at r ~ U[0, eps].
            r_ray = (eps * radius_u()).to(x0.dtype).reshape(view)
            g, _ = passes.input_grad(x0 + r_ray * direction(), y, loss_fn)
            sum_ray += ops.row_norm(g).to(acc)

    e_ball = sum_ball / n_samples
    e_ray = eps * sum_ray / n_samples
    if reduction == "mean":
        e_ball, e_ray = e_ball.mean(), e_ray.mean()
    elif reduction == "sum":
        e_ball, e_ray = e_ball.sum(), e_ray.sum()
    return {"E_B": e_ball.detach(), "E_eps": e_ray.detach()}
