"""One training step (objective, backward, optimiser step), run eagerly or
replayed from a CUDA graph.

A small model's ATER step on a GPU is bound by kernel launches, not arithmetic:
the clean forward and backward, the adversarial pass, pass 2 and the penalty's
double backward are hundreds of small kernels. :class:`TrainStep` with
``cuda_graph=True`` records the whole step once (PyTorch's whole-network
capture: `torch.cuda.graph`) and replays it for every later batch, so the CPU
launches nothing but the replay. Off CUDA it runs the same step eagerly.

    optimizer = torch.optim.Adam(model.parameters(), capturable=True)   # CUDA parameters
    step = ater_ext.TrainStep(model, optimizer, lambda m, x, y: ater_ext.objectives.ater_loss(m, x, y),
                              cuda_graph=True)
    for x, y in loader:          # every batch must have the same shape (drop_last=True)
        loss = step(x, y)        # a detached tensor; float(loss) synchronises
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .passes import unwrap_model

__all__ = ["TrainStep", "backward_into_parameters", "check_capturable_optimizer", "check_static_batch"]

StepLoss = Callable[[nn.Module, Tensor, Tensor], Union[Tensor, Tuple[Tensor, object]]]


def _split_output(output: Union[Tensor, Tuple[Tensor, object]]) -> Tuple[Tensor, Optional[dict]]:
    """``(loss, stats)`` of ``loss_fn``'s output: a scalar tensor, or ``(loss, stats)``
    as the objectives return (stats None unless a dict)."""
    if isinstance(output, (tuple, list)) and not 1 <= len(output) <= 2:
        raise TypeError(f"ater_ext.TrainStep: loss_fn must return a scalar tensor or (scalar tensor, stats), "
                        f"got a {type(output).__name__} of length {len(output)}")
    loss, stats = ((output[0], output[1] if len(output) > 1 else None) if isinstance(output, (tuple, list))
                   else (output, None))
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise TypeError(f"ater_ext.TrainStep: loss_fn must return a scalar tensor or (scalar tensor, stats), "
                        f"got {type(loss).__name__}{list(loss.shape) if isinstance(loss, Tensor) else ''}")
    return loss, stats if isinstance(stats, dict) else None


def backward_into_parameters(loss: Tensor, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
                             ) -> None:
    """``loss.backward()`` into the parameters that require grad (the model's and
    the optimiser's) and nothing else.

    A plain ``backward()`` also fills the ``.grad`` of every other leaf it
    reaches: for :func:`ater_ext.objectives.ater_loss` and
    :func:`ater_ext.energy_reg` that is the penalty's ``x_max`` (and under
    autocast the clean input), one wasted input-gradient product each
    (1 to 7 % of an MLP's ATER step on a CPU). The parameters' gradients are the same.

    What a plain backward does that this one does not: tensors that are neither
    the model's nor the optimiser's parameters get no ``.grad`` (give such a
    learnable tensor to the optimiser), and module full backward hooks on
    layers that only see the skipped leaf (the first layer of the penalty's
    pass) do not fire; tools built on those hooks (per-sample gradients,
    gradient logging) need a plain ``loss.backward()``. With no trainable
    parameter at all it is a plain backward.
    """
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    if optimizer is not None:
        for group in optimizer.param_groups:
            params.update((id(p), p) for p in group["params"] if p.requires_grad)
    loss.backward(inputs=list(params.values()) or None)


def check_capturable_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """A captured ``optimizer.step()`` must do all its work on the GPU: optimisers
    with ``capturable=True`` (Adam, AdamW, ...: step counters on the device) or
    SGD (no counters). Others keep host-side state that a replay would freeze."""
    if isinstance(optimizer, torch.optim.SGD):
        return
    if not all(group.get("capturable") is True for group in optimizer.param_groups):
        raise ValueError(f"ater_ext.TrainStep: cuda_graph=True needs torch.optim.SGD or an optimizer constructed "
                         f"with capturable=True (e.g. Adam, AdamW); got {type(optimizer).__name__} without it")


def check_static_batch(static: Tuple[Tensor, Tensor], batch: Tuple[Tensor, Tensor]) -> None:
    """A CUDA graph replays fixed shapes, dtypes and devices: every batch must match the captured one."""
    for name, s, b in zip(("x", "y"), static, batch):
        if b.shape != s.shape or b.dtype != s.dtype or b.device != s.device:
            raise ValueError(f"ater_ext.TrainStep: the CUDA graph was captured with {name} {list(s.shape)} "
                             f"{s.dtype} on {s.device}, got {list(b.shape)} {b.dtype} on {b.device}; use equal "
                             f"batches (DataLoader(drop_last=True)) or a TrainStep per shape")


class TrainStep:
    """``optimizer.zero_grad(); loss_fn(model, x, y).backward(inputs=params); optimizer.step()``.

    ``params`` are the model's and the optimiser's parameters that require
    grad: no other tensor gets a ``.grad`` from the step, so the ater_ext
    objectives' internal leaves (the penalty's ``x_max``) cost no gradient.

    Args:
        model: the module ``loss_fn`` trains.
        optimizer: its optimiser; with ``cuda_graph=True`` on CUDA, SGD or one
            constructed with ``capturable=True`` (Adam, AdamW; CUDA parameters only).
        loss_fn: ``(model, x, y) -> loss`` or ``(loss, stats)`` (as the
            :mod:`ater_ext.objectives` return), or a loss module such as
            :class:`ater_ext.ATERLoss` (its ``last_stats`` become the step's stats).
        cuda_graph: on CUDA, run the first call eagerly on a side stream (it
            initialises the optimiser state and the libraries' handles; it is a
            real step, nothing is repeated), capture the step into a CUDA graph,
            and replay it for every later call. Off CUDA the step runs eagerly
            (with a warning), so the same script runs anywhere. The captured
            step must be capturable: fixed batch shape, no host synchronisation
            in ``loss_fn`` (``.item()``, printing values), no GradScaler, and for
            the ater_ext losses no active dropout (``nn.Dropout`` layers are refused
            during capture; ``F.dropout`` or attention dropout inside ``forward``
            is not detected and would draw other masks in the extra passes),
            autocast entered inside ``loss_fn`` (not around the call), one
            process (no DDP). Python values read by the captured code are
            frozen at capture, a float learning rate included: for a schedule
            give Adam / AdamW (``capturable=True``) a CUDA tensor ``lr`` and
            change it in place. If capturing fails, the error says so; the
            first (eager) step has been applied and its gradients are in ``.grad``.

    Calling it returns the detached loss (a fresh tensor on each call);
    :attr:`last_stats` has the stats of the last step when ``loss_fn`` returns them.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: StepLoss, *,
                 cuda_graph: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.cuda_graph = bool(cuda_graph)
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._static_batch: Optional[Tuple[Tensor, Tensor]] = None
        self._static_loss: Optional[Tensor] = None
        self._stats: Optional[Dict[str, Union[float, Tensor]]] = None
        self._captured_stats: Optional[Dict[str, Union[float, Tensor]]] = None
        self._capture_error: Optional[BaseException] = None
        self._warned_fallback = False

    @property
    def captured(self) -> bool:
        """Whether later calls replay a recorded CUDA graph."""
        return self._graph is not None

    @property
    def last_stats(self) -> Optional[Dict[str, float]]:
        """The stats ``loss_fn`` returned for the last step (floats; after a
        replay, reading them waits for the GPU), or None."""
        if self._stats is None:
            return None
        device = next((v.device for v in self._stats.values() if isinstance(v, Tensor)), None)
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in self._stats.values()])
        return dict(zip(self._stats, stacked.tolist()))  # one wait for the GPU, not one per key

    def _run_loss(self, x: Tensor, y: Tensor) -> Tensor:
        loss, self._stats = _split_output(self.loss_fn(self.model, x, y))
        if self._stats is None:  # a loss module (ater_ext.ATERLoss, ...) keeps its stats as last_stats
            stats = getattr(self.loss_fn, "last_stats", None)
            self._stats = stats if isinstance(stats, dict) else None
        return loss

    def _backward(self, loss: Tensor) -> None:
        backward_into_parameters(loss, self.model, self.optimizer)

    def _eager(self, x: Tensor, y: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._run_loss(x, y)
        self._backward(loss)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if not self.cuda_graph:
            return self._eager(x, y)
        if x.device.type != "cuda":
            if not self._warned_fallback:
                warnings.warn(f"ater_ext.TrainStep: cuda_graph=True with x on {x.device}: CUDA graphs need CUDA "
                              f"tensors, running the step eagerly", stacklevel=2)
                self._warned_fallback = True
            return self._eager(x, y)
        if self._capture_error is not None:
            raise RuntimeError(f"ater_ext.TrainStep: this step could not be captured ({self._capture_error}); "
                               f"use cuda_graph=False for it") from self._capture_error
        with torch.cuda.device(x.device):
            if self._graph is None:
                return self._first_step_and_capture(x, y)
            check_static_batch(self._static_batch, (x, y))
            for static, new in zip(self._static_batch, (x, y)):
                static.copy_(new)
            self._graph.replay()
            self._stats = self._captured_stats  # tensors each replay refreshes
            return self._static_loss.clone()

    def _check_can_capture(self) -> None:
        check_capturable_optimizer(self.optimizer)
        if unwrap_model(self.model) is not self.model:
            raise ValueError("ater_ext.TrainStep: cuda_graph=True does not capture DataParallel / "
                             "DistributedDataParallel models (their reducers synchronise); run DDP steps eagerly")
        if torch.is_autocast_enabled("cuda"):
            # the capture would reuse the eager step's cached weight casts, freed when autocast exits
            raise ValueError("ater_ext.TrainStep: cuda_graph=True called inside torch.autocast; enter autocast "
                             "inside loss_fn instead (torch.autocast('cuda', dtype, cache_enabled=False))")

    def _first_step_and_capture(self, x: Tensor, y: Tensor) -> Tensor:
        self._check_can_capture()
        # The first step runs eagerly on a side stream, as PyTorch's capture recipe
        # requires: it creates the optimiser state and cuBLAS / cuDNN workspaces,
        # so that the capture (on the same stream) records only steady-state work.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self._eager(x, y)
        torch.cuda.current_stream().wait_stream(side)
        eager_stats = self._stats
        self._static_batch = (x.detach().clone(), y.detach().clone())
        # Gradients set to None now are allocated from the graph's private pool
        # during capture, and every replay writes them there; capture runs
        # nothing, so the first step's gradients are copied in afterwards.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        first_grads = [p.grad for p in params]
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads' CUDA calls (a DataLoader's pin-memory
            # thread) must not invalidate this capture
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                static_loss = self._run_loss(*self._static_batch)
                self._backward(static_loss)
                self.optimizer.step()
        except Exception as exc:
            for p, g in zip(params, first_grads):
                p.grad = g
            self._stats, self._capture_error = eager_stats, exc
            raise RuntimeError(f"ater_ext.TrainStep: capturing the step in a CUDA graph failed (the first "
                               f"step ran eagerly and was applied): {exc}") from exc
        with torch.no_grad():
            for p, g in zip(params, first_grads):
                if p.grad is not None and g is not None:
                    p.grad.copy_(g)
        self._graph, self._static_loss = graph, static_loss.detach()
        self._captured_stats, self._stats = self._stats, eager_stats
        return loss
