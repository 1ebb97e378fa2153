"""How good is ``x_max``? The gradient norm each maximiser reaches, and what it costs.

ATER penalises ``||grad_x L||`` at a point of ``B(x, eps)`` where that norm is
large (Eq. 15); a maximiser that finds no such point makes the penalty a
penalty at a random point. :func:`study_x_max` runs, on one model and batch,
every maximiser the package offers and a few it does not, and measures:

* ``grad_norm``: ``mean_i ||grad_x L(point_i, y_i)||`` at the point reached,
  all points evaluated by the same pass (:func:`grad_norms`), in the study's
  precision;
* ``fraction``: that mean over the reference's (a strong maximiser, below):
  1.0 is as good as anything found, a random point of the sphere is the floor;
* ``cos_hvp``: the median per-sample cosine of the step ``point - x`` to the
  exact one-step direction ``H(x) normalize(g)``;
* cost: ``forward_equivalents``, the multiply-adds of every matrix product and
  convolution the maximiser dispatched (forward, backward, double backward,
  forward-mode; counted with ``torch.utils.flop_counter``'s formulas) over
  those of one forward of the model on the batch: the figure that does not
  depend on the machine's load; and wall and CPU seconds of one uncounted run.

The maximisers (``name``: what it is):

* ``clean``: ``x`` itself (the scale; not on the sphere);
* ``random``: ``x + eps * normalize(N(0, I))``;
* ``fd xi=...``: the paper's one-step finite difference (:func:`ater_ext.x_max`);
* ``central xi=...``: ``x + eps * normalize(g(x + xi u) - g(x - xi u))``, ``u = normalize(g(x))``;
* ``hvp``: the exact ``H(x) u`` by double backpropagation (``direction="hvp"``);
* ``hvp-fwd``: the same product by forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``;
* ``fd steps=k`` / ``hvp steps=k``: :func:`ater_ext.x_max` with ``steps=k`` (projected ascent on the sphere);
* ``reference``: ``starts`` starting points (the ``hvp`` and one-step ``fd`` points and
  random points of the sphere), each followed by ``iters`` steps of projected
  ascent of ``||grad_x L||`` in the ball with its exact gradient (double
  backpropagation), step ``eps * a_t`` with ``a_t`` decaying from 0.25 to 0.01;
  per row the best point of all those iterates and of every other maximiser's
  point (``x`` itself included: the ball holds it). It bounds from below what
  any maximiser can reach in the ball (points inside the ball count too), so
  fractions are at most 1, up to the rows of a batch-statistics BatchNorm model,
  which interact: a batch assembled row by row can move (up to 1.05 measured
  on ResNet-18 at batch 8).

Every pass runs through :class:`ater_ext.passes.ExtraPasses` from one captured
RNG state (the same dropout masks for every maximiser) in the model's own
mode; BatchNorm buffers and ``.grad`` are untouched. ``precision``: ``"fp32"``
or ``"fp64"`` (the model and batch as given: convert them first) or
``"bf16"``, the ATER penalty's bf16 autocast: the maximisers' passes run in
fp32 there by design (SPEC), so only the evaluation of the norms (the
penalty's forward and backward) runs under autocast.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from . import ops
from .checks import check_batch, check_choice, check_positive, resolve_loss_fn
from .energy import default_xi, x_max
from .outputs import OutputSpec
from .passes import ExtraPasses, LossFn, capture_rng_state

__all__ = ["PRECISIONS", "DEFAULT_XIS", "DEFAULT_STEPS", "grad_norms", "reference_x_max", "study_x_max",
           "FlopCount"]

PRECISIONS = ("fp32", "bf16", "fp64")
DEFAULT_XIS = (1e-4, 1e-3, 1e-2, 1e-1, 0.5)
DEFAULT_STEPS = (2, 4, 8)


class FlopCount(TorchDispatchMode):
    """Multiply-add FLOPs of the matrix products and convolutions dispatched inside
    (forward, backward and double backward alike: CPU autograd runs on this
    thread), by ``torch.utils.flop_counter``'s formulas (2 FLOPs a multiply-add)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += int(count(*args, **kwargs, out_val=out))
        return out


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def grad_norms(model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: Optional[LossFn] = None, rng_state=None,
               precision: str = "fp32", output: OutputSpec = None) -> Tensor:
    """``[B]``: ``||grad_x L(x_i, y_i)||`` of the summed loss, in fp64, one pass through
    :class:`~ater_ext.passes.ExtraPasses`; ``precision="bf16"`` runs it under bf16
    autocast (as the penalty's forward and backward run in a bf16 AMP loop)."""
    check_choice("grad_norms", "precision", precision, PRECISIONS)
    loss_fn = resolve_loss_fn(loss_fn, "grad_norms")
    with torch.enable_grad(), ExtraPasses(model, x, rng_state, output=output, op="grad_norms") as passes:
        leaf = x.detach().requires_grad_(True)
        with _autocast(x.device, precision):
            loss = loss_fn(passes.forward(leaf, detach_params=True), y, reduction="sum")
        (g,) = torch.autograd.grad(loss.float() if loss.dtype != torch.float64 else loss, leaf)
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    return ops.row_norm(g.to(acc)).double()


def _sphere(x: Tensor, d: Tensor, eps: float) -> Tensor:
    return ops.normalized_step(x.detach(), d, eps)


def _project_ball(x: Tensor, z: Tensor, eps: float) -> Tensor:
    """The nearest point of ``B(x, eps)`` (rescale the offset where it is longer than eps)."""
    offset = (z - x).flatten(1)
    norm = offset.norm(dim=1, keepdim=True)
    scale = torch.where(norm > eps, eps / norm.clamp_min(1e-300), torch.ones_like(norm))
    return x + (offset * scale).reshape(x.shape)


def _central(model, x, y, *, eps, xi, loss_fn, rng_state, output) -> Tensor:
    with torch.enable_grad(), ExtraPasses(model, x, rng_state, output=output, op="central") as passes:
        g = passes.input_grad(x, y, loss_fn)[0]
        plus, minus = ops.normalized_step(x.detach(), g, xi), ops.normalized_step(x.detach(), -g, xi)
        gp = passes.input_grad(plus, y, loss_fn)[0]
        gm = passes.input_grad(minus, y, loss_fn)[0]
        return ops.fd_direction(x.detach(), gm, gp, eps)


def _hvp_forward_over_reverse(model, x, y, *, eps, loss_fn, rng_state, output) -> Tensor:
    """``x + eps * normalize(H(x) u)`` with ``H(x) u = jvp(grad_x L, (x,), (u,))``."""
    with torch.enable_grad(), ExtraPasses(model, x, rng_state, output=output, op="hvp-fwd") as passes:
        g = passes.input_grad(x, y, loss_fn)[0]
        u = ops.normalized_step(torch.zeros_like(g), g, 1.0)

        def summed(z):
            return loss_fn(passes.forward(z, detach_params=True), y, reduction="sum")

        _, hv = torch.func.jvp(torch.func.grad(summed), (x.detach(),), (u,))
        return _sphere(x, hv, eps)


def reference_x_max(model: nn.Module, x: Tensor, y: Tensor, starts: Sequence[Tensor], *, eps: float,
                    iters: int = 30, loss_fn: Optional[LossFn] = None, rng_state=None,
                    output: OutputSpec = None) -> Tensor:
    """Per row, the best point of ``iters`` steps of projected ascent of
    ``||grad_x L||`` in ``B(x, eps)`` from each of ``starts`` (and the starts
    themselves), with the exact gradient ``grad_z ||grad_z L(z)||`` (double
    backpropagation); step ``eps * a_t``, ``a_t`` from 0.25 down to 0.01 (cosine)."""
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"ater_ext.reference_x_max: iters must be an integer >= 1, got {iters!r}")
    loss_fn = resolve_loss_fn(loss_fn, "reference_x_max")
    x0 = x.detach()
    best, best_norm = None, None
    view = (-1,) + (1,) * (x.dim() - 1)
    with torch.enable_grad(), ExtraPasses(model, x, rng_state, output=output, op="reference_x_max") as passes:
        for start in starts:
            z = start.detach()
            for t in range(iters + 1):
                g, leaf = passes.input_grad(z, y, loss_fn, create_graph=t < iters)
                norm = g.detach().flatten(1).double().norm(dim=1)
                if best is None:
                    best, best_norm = z, norm
                else:
                    better = norm > best_norm
                    best = torch.where(better.reshape(view), z, best)
                    best_norm = torch.where(better, norm, best_norm)
                if t == iters:
                    break
                (d,) = torch.autograd.grad(ops.row_norm(g).sum(), leaf)
                a = 0.01 + 0.5 * (0.25 - 0.01) * (1 + math.cos(math.pi * t / max(iters - 1, 1)))
                z = _project_ball(x0, ops.normalized_step(z.detach(), d, a * eps), eps).detach()
    return best


def _timed(fn: Callable[[], Tensor]):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _counted(fn: Callable[[], Tensor]):
    with FlopCount() as counter:
        out = fn()
    return out, counter.flops


def study_x_max(model: nn.Module, x: Tensor, y: Tensor, *, eps: float = 2.0, precision: str = "fp32",
                xis: Sequence[float] = DEFAULT_XIS, central_xis: Sequence[float] = (1e-2, 1e-1),
                steps: Sequence[int] = DEFAULT_STEPS, reference_iters: int = 30, reference_random_starts: int = 1,
                loss_fn: Optional[LossFn] = None, output: OutputSpec = None, seed: int = 0,
                time_runs: bool = True, also_bf16: bool = False) -> Dict[str, object]:
    """Every maximiser of ``x_max`` on one model and batch: norm reached, fraction of
    the reference, direction cosine to the exact HVP, counted and timed cost (see
    the module docstring). ``precision`` describes ``x`` / the model (``"fp32"``,
    ``"fp64"``) or asks for the bf16 autocast evaluation (``"bf16"``; the model and
    ``x`` in fp32). ``time_runs=False`` skips the uncounted timing runs.
    ``also_bf16`` (fp32 only): the same points evaluated again under bf16
    autocast, as ``grad_norm_bf16`` / ``fraction_bf16`` (what ``precision="bf16"``
    gives, without running the fp32 maximisers twice).

    Returns ``{"batch", "eps", "precision", "forward_flops", "methods": [row, ...]}``,
    one row per maximiser: ``name``, ``grad_norm``, ``fraction``, ``median_fraction``
    (of the per-sample ratios to the reference), ``cos_hvp``, ``forward_equivalents``,
    ``seconds``, ``cpu_seconds``.
    """
    op = "study_x_max"
    check_batch(op, x, y)
    eps = check_positive(op, "eps", eps, x.dtype)
    check_choice(op, "precision", precision, PRECISIONS)
    if precision == "fp64" and x.dtype != torch.float64:
        raise ValueError(f"ater_ext.{op}: precision='fp64' needs an fp64 model and x, got x {x.dtype} "
                         f"(call model.double() and x.double() first)")
    if precision != "fp64" and x.dtype != torch.float32:
        raise ValueError(f"ater_ext.{op}: precision={precision!r} needs an fp32 model and x, got x {x.dtype}")
    loss_fn = resolve_loss_fn(loss_fn, op)
    rng = capture_rng_state(x.device)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noise = [torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
             for _ in range(1 + reference_random_starts)]
    common = dict(eps=eps, loss_fn=loss_fn, rng_state=rng, output=output)

    methods: Dict[str, Callable[[], Tensor]] = {"clean": lambda: x.detach().clone(),
                                                "random": lambda: _sphere(x, noise[0], eps)}
    for xi in xis:
        methods[f"fd xi={xi:g}"] = lambda xi=xi: x_max(model, x, y, xi=xi, **common)
    for xi in central_xis:
        methods[f"central xi={xi:g}"] = lambda xi=xi: _central(model, x, y, xi=xi, **common)
    methods["hvp"] = lambda: x_max(model, x, y, direction="hvp", **common)
    methods["hvp-fwd"] = lambda: _hvp_forward_over_reverse(model, x, y, **common)
    for k in steps:
        methods[f"fd steps={k}"] = lambda k=k: x_max(model, x, y, steps=k, **common)
    for k in steps:
        methods[f"hvp steps={k}"] = lambda k=k: x_max(model, x, y, direction="hvp", steps=k, **common)

    with _autocast(x.device, precision):
        with torch.no_grad(), FlopCount() as fwd:
            ExtraPasses(model, x, rng, output=output, op=op).forward(x.detach(), detach_params=True)
        points, cost = {}, {}
        for name, fn in methods.items():
            points[name], flops = _counted(fn)
            seconds = cpu = float("nan")
            if time_runs:
                _, seconds, cpu = _timed(fn)
            cost[name] = (flops, seconds, cpu)
        default_fd = f"fd xi={default_xi(x.dtype):g}"
        fd_point = points.get(default_fd, x_max(model, x, y, **common))
        starts = [points["hvp"], fd_point] + [_sphere(x, n, eps) for n in noise[1:]]
        ref_fn = lambda: reference_x_max(model, x, y, starts, iters=reference_iters, **common)  # noqa: E731
        ref_point, ref_flops = _counted(ref_fn)
        ref_s = ref_cpu = float("nan")
        if time_runs:
            _, ref_s, ref_cpu = _timed(ref_fn)

    norms = {name: grad_norms(model, p, y, loss_fn=loss_fn, rng_state=rng, precision=precision, output=output)
             for name, p in points.items()}
    # the reference: per row the best of its ascent and of every maximiser's point on the sphere or in the ball
    ref_norm = grad_norms(model, ref_point, y, loss_fn=loss_fn, rng_state=rng, precision=precision, output=output)
    best, best_norm = ref_point, ref_norm
    view = (-1,) + (1,) * (x.dim() - 1)
    for name, p in points.items():
        better = norms[name] > best_norm
        best = torch.where(better.reshape(view), p, best)
        best_norm = torch.where(better, norms[name], best_norm)
    ref_norm = grad_norms(model, best, y, loss_fn=loss_fn, rng_state=rng, precision=precision, output=output)
    points["reference"], norms["reference"] = best, ref_norm
    cost["reference"] = (ref_flops, ref_s, ref_cpu)

    bf16 = {}
    if also_bf16 and precision == "fp32":
        bf16 = {name: grad_norms(model, p, y, loss_fn=loss_fn, rng_state=rng, precision="bf16", output=output)
                for name, p in points.items() if name != "reference"}
        # the reference point assembled by the bf16 norms, as precision="bf16" would
        best, best_norm = ref_point, grad_norms(model, ref_point, y, loss_fn=loss_fn, rng_state=rng,
                                                precision="bf16", output=output)
        for name, p in points.items():
            if name == "reference":
                continue
            better = bf16[name] > best_norm
            best = torch.where(better.reshape(view), p, best)
            best_norm = torch.where(better, bf16[name], best_norm)
        bf16["reference"] = grad_norms(model, best, y, loss_fn=loss_fn, rng_state=rng, precision="bf16",
                                       output=output)
    hvp_dir = (points["hvp"] - x).flatten(1).double()
    ref_mean = ref_norm.mean().item()
    rows: List[Dict[str, object]] = []
    for name, p in points.items():
        flops, seconds, cpu = cost[name]
        step = (p - x).flatten(1).double()
        cos = F.cosine_similarity(step, hvp_dir, dim=1).median().item() if name != "clean" else float("nan")
        per_sample = norms[name] / ref_norm.clamp_min(1e-300)
        rows.append({"name": name, "grad_norm": norms[name].mean().item(),
                     "fraction": norms[name].mean().item() / ref_mean if ref_mean > 0 else float("nan"),
                     "median_fraction": per_sample.median().item(), "cos_hvp": cos,
                     "max_offset": step.norm(dim=1).max().item(),
                     "forward_equivalents": flops / fwd.flops if fwd.flops else float("nan"),
                     "seconds": seconds, "cpu_seconds": cpu})
        if bf16:
            rows[-1]["grad_norm_bf16"] = bf16[name].mean().item()
            rows[-1]["fraction_bf16"] = bf16[name].mean().item() / bf16["reference"].mean().item()
    return {"batch": int(x.shape[0]), "eps": eps, "precision": precision, "forward_flops": int(fwd.flops),
            "reference_iters": int(reference_iters), "reference_starts": len(starts), "methods": rows}
