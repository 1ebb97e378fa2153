"""The extra forward/backward passes of ATER, AT and VAT, run with the
semantics users depend on (SPEC "Training-mode semantics").

Every pass that is not the caller's clean forward goes through
:class:`ExtraPasses`, which

* swaps the module's buffers for the pass (via :func:`torch.func.functional_call`):
  train-mode BatchNorm gets no running statistics (it normalises with batch
  statistics either way), other buffers scratch copies, so BatchNorm running
  statistics and ``num_batches_tracked`` are never written and nothing is
  restored in place (which would break autograd's version counters);
* replays the first pass's random draws in every later pass (a thread-local
  :class:`ater_ext.randomness.RandomTape`; the global RNG is never set), so
  dropout masks match between the clean gradient (pass 1), the probe gradient
  (pass 2) and the penalty;
* maps the model's output to logits (``output=``, :func:`ater_ext.outputs.resolve_output`)
  and feeds every pass in the clean batch's memory format (channels_last stays
  channels_last);
* gives the input-gradient passes detached parameters: they build no graph to
  the weights and compute no weight gradients, and ``.grad`` is never touched;
* runs on the module inside a ``DistributedDataParallel`` / ``DataParallel``
  wrapper, so the wrapper's reducer sees only the caller's one backward.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .checks import check_grad_mode
from .outputs import OutputSpec, resolve_output
from .randomness import RandomTape, RngState, capture_rng_state, restore_rng_state

__all__ = ["RngState", "capture_rng_state", "restore_rng_state", "unwrap_model", "is_capturing",
           "has_active_dropout", "memory_format_of", "in_memory_format", "ExtraPasses"]

LossFn = Callable[..., Tensor]


def is_capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is recording a CUDA graph (never true off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``channels_last`` / ``channels_last_3d`` for a batch stored that way, else ``contiguous_format``."""
    for dim, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if x.dim() == dim and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def in_memory_format(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t`` stored in ``fmt`` (the fused ops return contiguous tensors; the caller's format is kept)."""
    return t if fmt == torch.contiguous_format else t.contiguous(memory_format=fmt)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (else ``model``)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


@contextlib.contextmanager
def _autocast_disabled(device_type: str):
    with torch.autocast(device_type=device_type, enabled=False):
        yield


_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _buffer_plan(module: nn.Module) -> Dict[str, Tuple[Optional[Tensor], bool]]:
    """name -> (tensor a pass uses, clone it per pass?), so that no pass writes the caller's buffers.

    BatchNorm1d/2d/3d in train mode normalise with batch statistics; given
    ``None`` running statistics they also update nothing (no copy, nothing held
    by the graph). In eval mode they only read them (shared as they are). Every
    other buffer (SyncBatchNorm's, which insist on updating, or any module's
    own state) gets a fresh copy per pass.
    """
    plan: Dict[str, Tuple[Optional[Tensor], bool]] = {}
    for prefix, sub in module.named_modules():
        for name, buf in sub.named_buffers(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            plain_bn = (isinstance(sub, nn.modules.batchnorm._BatchNorm)
                        and not isinstance(sub, nn.SyncBatchNorm) and name in _BN_STATS)
            if plain_bn and sub.training:
                plan[key] = (None, False)
            elif plain_bn:
                plan[key] = (buf, False)
            else:
                plan[key] = (buf, buf is not None)
    return plan


def has_active_dropout(module: nn.Module) -> bool:
    """Whether ``module`` has a dropout layer that is in training mode with p > 0."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in module.modules())


def _check_capturable(module: nn.Module, compile_mode: Optional[str]) -> None:
    """Refuses what cannot run inside a CUDA graph capture, with the way out."""
    if has_active_dropout(module):
        raise RuntimeError(
            "ater_ext: the extra passes replay the clean forward's dropout masks (recorded as the forward "
            "runs), which is not supported inside a CUDA graph capture; capture only models without active "
            "dropout (or run this step eagerly)")
    if _MODE_OPTIONS.get(compile_mode, {}).get("triton.cudagraphs", False):
        raise RuntimeError(
            f"ater_ext: compile={compile_mode!r} records CUDA graphs of its own, which cannot be nested "
            "in a CUDA graph capture; use compile=False or 'default' inside a captured step")


def _has_cudnn_rnn(module: nn.Module, device: torch.device) -> bool:
    return (device.type == "cuda" and torch.backends.cudnn.enabled
            and any(isinstance(m, nn.RNNBase) for m in module.modules()))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def check_compile_mode(compile: Union[bool, str]) -> Optional[str]:
    """``False`` -> None (eager); ``True`` -> "default"; a torch.compile mode name as is."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "default"
    if compile not in COMPILE_MODES:
        raise ValueError(f"ater_ext: compile must be a bool or one of {list(COMPILE_MODES)}, got {compile!r}")
    return compile


# torch.compile mode -> inductor options, plus fallback_random (see compiled_input_grad)
_MODE_OPTIONS = {
    "default": {},
    "reduce-overhead": {"triton.cudagraphs": True},
    "max-autotune": {"max_autotune": True, "triton.cudagraphs": True},
    "max-autotune-no-cudagraphs": {"max_autotune": True},
}
_COMPILED: Dict[Tuple[LossFn, str], Callable] = {}


def _input_grad_graph(module: nn.Module, loss_fn: LossFn, logits_of: Callable, params, buffers, x: Tensor,
                      y: Tensor) -> Tensor:
    def summed_loss(x_, bufs):
        return loss_fn(logits_of(functional_call(module, {**params, **bufs}, (x_,))), y, reduction="sum")
    return torch.func.grad(summed_loss)(x, buffers)


def compiled_input_grad(loss_fn: LossFn, mode: str, output: OutputSpec = None) -> Callable:
    """``(module, params, buffers, x, y) -> grad_x sum_i L(x_i, y_i)`` compiled as one graph.

    Built with ``torch.func.grad`` over ``functional_call`` (dynamo traces it
    whole, unlike ``torch.autograd.grad``); the buffers are explicit inputs so
    BatchNorm's in-place statistics updates land in the scratch copies.
    ``fallback_random`` keeps eager PyTorch's random streams, so dropout masks
    match the eager passes started from the same RNG state. Only first-order
    passes are compiled: double backward through compiled graphs is unsupported.
    One compiled function per (loss_fn, mode, output); dynamo specialises it per module.
    """
    key = (loss_fn, mode, output)
    if key not in _COMPILED:
        options = {**_MODE_OPTIONS[mode], "fallback_random": True}
        _COMPILED[key] = torch.compile(functools.partial(_input_grad_graph, loss_fn=loss_fn,
                                                         logits_of=resolve_output(output, op="compiled pass")),
                                       options=options)
    return _COMPILED[key]


class ExtraPasses:
    """Context manager running the extra passes of one objective evaluation.

    Args:
        model: the caller's model (possibly DDP-wrapped).
        x: the clean batch (its device, and the memory format every pass is fed in).
        rng_state: where the first pass draws its random numbers (dropout masks)
            from: ``None`` for the global generators, as a plain forward (which
            they then advance like one forward), or the state of a forward the
            caller already ran (:func:`capture_rng_state`), replayed through
            private generators (the global RNG is left as it is). Every later
            pass replays the first pass's draws; see :mod:`ater_ext.randomness`.
        compile: run the first-order input-gradient passes through
            ``torch.compile`` (``True``, or a torch.compile mode such as
            ``"reduce-overhead"`` for CUDA graphs); see :func:`compiled_input_grad`.
            Models with active dropout layers, or whose earlier passes drew random
            numbers, keep eager passes.
        tape: the :class:`~ater_ext.randomness.RandomTape` to share with a
            forward run outside (the objectives' clean forward records into it).
        output: where the logits are in the model's output (:func:`ater_ext.outputs.resolve_output`).
        op: the calling function's name, for error messages.
    """

    def __init__(self, model: nn.Module, x: Tensor, rng_state: Optional[RngState] = None,
                 compile: Union[bool, str] = False, *, tape: Optional[RandomTape] = None,
                 output: OutputSpec = None, op: str = "ExtraPasses"):
        check_grad_mode(op, x)
        self.module = unwrap_model(model)
        # Compiled graphs draw dropout masks of their own, so models with active
        # dropout keep eager passes (the same-masks guarantee comes first).
        mode = check_compile_mode(compile)
        self.compile_mode = None if has_active_dropout(self.module) else mode
        self.device = x.device
        self.memory_format = memory_format_of(x)
        if is_capturing(self.device):
            _check_capturable(self.module, self.compile_mode)
        self.tape = tape if tape is not None else RandomTape(rng_state)
        self.output = output
        self.logits_of = resolve_output(output, op=op)
        self._buffer_plan = _buffer_plan(self.module)
        self._detached_params = {name: p.detach() for name, p in self.module.named_parameters()}

    def __enter__(self) -> "ExtraPasses":
        return self

    def __exit__(self, *exc) -> None:
        self.tape.entries = []  # the recorded draws are not needed after the evaluation

    def _pass_buffers(self) -> Dict[str, Optional[Tensor]]:
        """The buffers one pass sees: see :func:`_buffer_plan`."""
        return {name: (b.clone() if clone else b) for name, (b, clone) in self._buffer_plan.items()}

    @property
    def work_dtype(self) -> Optional[torch.dtype]:
        """fp32 when autocast is on for this device (the probe passes run in fp32)."""
        return torch.float32 if torch.is_autocast_enabled(self.device.type) else None

    def forward(self, x: Tensor, *, detach_params: bool) -> Tensor:
        """One forward pass on scratch buffers, the first pass's random draws replayed: the logits."""
        tensors = self._pass_buffers()
        if detach_params:
            tensors.update(self._detached_params)
        with self.tape.run():
            out = functional_call(self.module, tensors, (in_memory_format(x, self.memory_format),))
        return self.logits_of(out)

    def input_grad(self, x: Tensor, y: Tensor, loss_fn: LossFn, *, create_graph: bool = False
                   ) -> Tuple[Tensor, Tensor]:
        """``grad_x sum_i L(x_i, y_i)`` with detached parameters, in fp32 under autocast.

        Returns ``(g, x_leaf)``; with ``create_graph=True`` ``g`` is differentiable
        with respect to ``x_leaf`` (for the exact Hessian-vector product).
        """
        work = self.work_dtype
        x_leaf = (x.detach().to(work) if work is not None and x.dtype != work else x.detach())
        if self.compile_mode is not None and not create_graph and not self.tape.entries:
            return self._compiled_input_grad(x_leaf, y, loss_fn), x_leaf
        x_leaf.requires_grad_(True)
        with torch.enable_grad(), _autocast_disabled(self.device.type):
            loss = loss_fn(self.forward(x_leaf, detach_params=True), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, x_leaf, create_graph=create_graph)
        return g, x_leaf

    def _compiled_input_grad(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        fn = compiled_input_grad(loss_fn, self.compile_mode, self.output)
        buffers = self._pass_buffers()
        with _autocast_disabled(self.device.type):
            g = fn(self.module, params=self._detached_params, buffers=buffers,
                   x=in_memory_format(x, self.memory_format), y=y)
        # CUDA-graph modes reuse their output memory on the next replay
        return g.clone() if self.compile_mode != "default" else g

    def penalty_forward(self, x: Tensor) -> Tensor:
        """The forward whose input gradient is penalised: real parameters, ambient
        autocast; the math attention backend (flash / efficient attention have no
        double backward) and, for cuDNN RNNs (not twice differentiable), cuDNN off."""
        stack = contextlib.ExitStack()
        with stack:
            if self.device.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            if _has_cudnn_rnn(self.module, self.device):
                stack.enter_context(torch.backends.cudnn.flags(enabled=False))
            return self.forward(x, detach_params=False)
