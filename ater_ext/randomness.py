"""Same random draws in every extra pass, without touching the global RNG.

The finite difference ``g2 - g`` of ATER must compare two passes with the same
dropout masks (SPEC "Training-mode semantics"). Restoring the global generator
before each pass (``torch.set_rng_state``) does that for one thread only: the
global generator is shared by the whole process, so another thread drawing
meanwhile gets repeated numbers, and two threads running passes clobber each
other's masks. Here instead:

* the first pass of an objective evaluation (the objectives' clean forward, or
  pass 1) runs under a :class:`RandomTape` that records every random draw the
  model makes (dropout masks, ``torch.rand*``, in-place ``uniform_`` etc.), and
  every later pass replays them in order. The draws come from the global
  generator exactly as in a plain forward (thread-safe: a generator serialises
  its draws), and it is never set or restored;
* with a given ``rng_state`` (the state before the caller's own forward, see
  :func:`capture_rng_state`) the first pass draws from private generators set
  to that state, so it sees that forward's masks, and the global generator is
  not touched at all.

The recording is a :class:`torch.overrides.TorchFunctionMode`, which is
thread-local, so passes in two threads never see each other. It intercepts the
random functions called from Python: ``F.dropout`` and its 1d / 2d / 3d /
alpha variants (every ``nn.Dropout*`` layer), and the sampling functions and
in-place samplers of :data:`SAMPLERS`. Draws that no generator can be given to
(``scaled_dot_product_attention`` with ``dropout_p > 0``, ``nn.MultiheadAttention``'s
dropout, RNN dropout, ``F.rrelu`` in training, ``F.gumbel_softmax``, and the
fused ``F.dropout`` off CPU when replaying a given ``rng_state``) are replayed by
setting the global generator for that one call and restoring it after: another
thread drawing during that call can get repeated numbers. A random function
called inside another Python-level ``torch.nn.functional`` function than these
is not seen (the outer function's dispatch hides it) and would draw anew in
each pass.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["RngState", "capture_rng_state", "restore_rng_state", "RandomTape", "SAMPLERS"]

# (CPU generator state, (cuda device index, its generator state) or None)
RngState = Tuple[Tensor, Optional[Tuple[int, Tensor]]]


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def capture_rng_state(device: torch.device) -> RngState:
    """The RNG state that a forward on ``device`` draws its dropout masks from.

    Capture it before a clean forward and pass it as ``rng_state=`` to
    :func:`ater_ext.energy_reg` so that the extra passes reuse that forward's masks.
    While a CUDA graph is being captured the CUDA generator cannot be read, so
    only the CPU state is kept. Reading the state changes nothing.
    """
    device = torch.device(device)
    cuda_state = None
    if device.type == "cuda" and not _is_capturing(device):
        index = _cuda_index(device)
        cuda_state = (index, torch.cuda.get_rng_state(index))
    return torch.get_rng_state(), cuda_state


def restore_rng_state(state: RngState) -> None:
    """Sets the global generators to ``state`` (process-wide: other threads see it too)."""
    cpu_state, cuda_state = state
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state[1], cuda_state[0])


# ------------------------------------------------------------------ the tape
class RandomTape:
    """The random draws of one objective evaluation: recorded by the first pass, replayed by the others.

    Args:
        rng_state: where the first pass draws from: ``None`` for the global
            generators (as a plain forward), or a state from
            :func:`capture_rng_state`, replayed through private generators.
    """

    def __init__(self, rng_state: Optional[RngState] = None):
        self._start = rng_state
        self._private: Dict[str, Optional[torch.Generator]] = {}
        self.entries: List[Tuple[str, Any]] = []
        self.recorded = False

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        """One forward pass: the first records, every later one replays. A model
        whose first pass drew nothing is taken to draw nothing: later passes then
        run without the recording mode (it costs a few microseconds per call)."""
        replay = self.recorded
        if replay and not self.entries:
            yield
            return
        if not replay:
            self.entries = []
        with _TapeMode(self, replay):
            yield
        self.recorded = True

    # -- where the first pass draws from
    def generator_for(self, device: torch.device) -> Optional[torch.Generator]:
        """The private generator for ``device`` (None: draw from the global one)."""
        if self._start is None:
            return None
        device = torch.device(device)
        key = str(device) if device.type != "cuda" else f"cuda:{_cuda_index(device)}"
        if key not in self._private:
            self._private[key] = None
            cpu_state, cuda_state = self._start
            if device.type == "cpu":
                self._private[key] = torch.Generator().set_state(cpu_state)
            elif device.type == "cuda" and cuda_state is not None and cuda_state[0] == _cuda_index(device):
                self._private[key] = torch.Generator(device=key).set_state(cuda_state[1])
        return self._private[key]

    @contextlib.contextmanager
    def global_state(self, device: torch.device, state: Optional[Tensor]) -> Iterator[Optional[Tensor]]:
        """Runs one opaque draw on the global generator of ``device`` set to ``state``
        (None: as it is), then restores it; yields the state the draw started from."""
        cuda = device.type == "cuda"
        index = _cuda_index(device) if cuda else None
        get = (lambda: torch.cuda.get_rng_state(index)) if cuda else torch.get_rng_state
        put = (lambda s: torch.cuda.set_rng_state(s, index)) if cuda else torch.set_rng_state
        private = None if state is not None else self.generator_for(device)
        if state is None and private is None:  # first pass from the global generator: just read it
            yield get()
            return
        saved = get()
        start = state if state is not None else private.get_state()
        put(start)
        try:
            yield start
            if private is not None:
                private.set_state(get())  # the private stream continues after this draw
        finally:
            put(saved)


def _arg(args, kwargs, index: int, name: str, default):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _device_of(args, kwargs) -> torch.device:
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    for a in args:
        if isinstance(a, Tensor):
            return a.device
    return torch.get_default_device()


class _TapeMode(TorchFunctionMode):
    """Records (first pass) or replays (later passes) the random calls of a forward."""

    def __init__(self, tape: RandomTape, replay: bool):
        super().__init__()
        self.tape = tape
        self.replay = replay
        self.cursor = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            return func(*args, **kwargs)
        return handler(self, func, args, kwargs)

    def next_entry(self, kind: str, func) -> Any:
        entries = self.tape.entries
        if self.cursor >= len(entries) or entries[self.cursor][0] != kind:
            got = entries[self.cursor][0] if self.cursor < len(entries) else "nothing"
            raise RuntimeError(f"ater_ext: the model's random draws differ between the passes of one evaluation "
                               f"(draw {self.cursor + 1}: {getattr(func, '__name__', func)} here, {got} in the first "
                               f"pass); the extra passes replay the first pass's draws in order, so the model must "
                               f"draw the same random numbers in every forward")
        payload = entries[self.cursor][1]
        self.cursor += 1
        return payload

    def record(self, kind: str, payload: Any) -> None:
        self.tape.entries.append((kind, payload))


# ------------------------------------------------------------------- dropout
_ALPHA = 1.7580993408473766  # ATen's alpha_dropout constant

# F function -> (feature-wise?, alpha?, dims of a batched input or None for any, dims of an unbatched one)
_DROPOUTS: Dict[Callable, Tuple[bool, bool, Optional[Tuple[int, ...]], Tuple[int, ...]]] = {
    F.dropout: (False, False, None, ()),
    F.alpha_dropout: (False, True, None, ()),
    F.feature_alpha_dropout: (True, True, None, ()),
    F.dropout1d: (True, False, (3,), (2,)),
    F.dropout2d: (True, False, (4,), ()),  # 3-D input: the function's own (deprecated) handling
    F.dropout3d: (True, False, (5,), (4,)),
}


def _dropout_noise(mode: _TapeMode, func, x: Tensor, p: float, feature: bool, alpha: bool, inplace: bool
                   ) -> Tuple[Tensor, Optional[Tensor]]:
    """(noise, b) as ATen's ``_dropout_impl`` draws them (so a given ``rng_state``
    reproduces the caller's own forward bit for bit): ``input * noise (+ b)``."""
    generator = mode.tape.generator_for(x.device)
    if x.device.type != "cpu" and not (feature or alpha or inplace):
        # off CPU, F.dropout is the fused native_dropout, which takes no generator
        if generator is None:
            noise = torch.native_dropout(x, p, True)[1].to(x.dtype)
        else:
            with mode.tape.global_state(x.device, None):
                noise = torch.native_dropout(x, p, True)[1].to(x.dtype)
    else:
        noise = x.new_empty([x.shape[0], x.shape[1]] + [1] * (x.dim() - 2)) if feature else torch.empty_like(x)
        noise.bernoulli_(1 - p, generator=generator)
    if alpha:
        a = 1.0 / ((_ALPHA * _ALPHA * p + 1) * (1 - p)) ** 0.5
        b = noise.add(-1).mul_(_ALPHA * a).add_(_ALPHA * a * p)
        return noise.mul_(a), b
    return noise.div_(1 - p), None


def _dropout(mode: _TapeMode, func, args, kwargs):
    x = args[0]
    p = float(_arg(args, kwargs, 1, "p", 0.5))
    training = bool(_arg(args, kwargs, 2, "training", True))
    inplace = bool(_arg(args, kwargs, 3, "inplace", False))
    feature, alpha, batched_dims, unbatched_dims = _DROPOUTS[func]
    if not training or not 0 < p < 1 or not isinstance(x, Tensor) or x.numel() == 0:
        return func(*args, **kwargs)  # no draw (or the function's own error)
    if feature and batched_dims is not None and x.dim() not in batched_dims + unbatched_dims:
        return _opaque(mode, func, args, kwargs)  # deprecated shapes: the function's own handling
    view = x.unsqueeze(0) if x.dim() in unbatched_dims else x
    if mode.replay:
        noise, b = mode.next_entry("dropout", func)
        if noise.dim() != view.dim() or noise.shape[0] != view.shape[0]:
            raise RuntimeError(f"ater_ext: {func.__name__} of a {list(x.shape)} input in this pass, of another shape "
                               f"in the first pass; every pass must run the same forward")
    else:
        noise, b = _dropout_noise(mode, func, view, p, feature, alpha, inplace)
        mode.record("dropout", (noise, b))
    out = view.mul_(noise) if inplace else view * noise
    if b is not None:
        out = out.add_(b)
    return x if inplace else out.reshape(x.shape) if view is not x else out


# ------------------------------------------------------------------ samplers
_FACTORIES = (torch.rand, torch.randn, torch.randint, torch.randperm)
_OUT_OF_PLACE = (torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli, torch.multinomial,
                 torch.normal, torch.poisson, Tensor.bernoulli, Tensor.multinomial)
_IN_PLACE = (Tensor.uniform_, Tensor.normal_, Tensor.bernoulli_, Tensor.random_, Tensor.exponential_,
             Tensor.geometric_, Tensor.cauchy_, Tensor.log_normal_)
SAMPLERS = _FACTORIES + _OUT_OF_PLACE + _IN_PLACE


def _sampler(mode: _TapeMode, func, args, kwargs):
    in_place = func in _IN_PLACE
    if mode.replay:
        value = mode.next_entry("sample", func)
        if in_place:
            target = args[0]
            if target.shape != value.shape:
                raise RuntimeError(f"ater_ext: {func.__name__} of a {list(target.shape)} tensor in this pass, "
                                   f"{list(value.shape)} in the first pass; every pass must run the same forward")
            return target.copy_(value)
        return value.clone()
    if kwargs.get("generator") is None:
        generator = mode.tape.generator_for(_device_of(args, kwargs))
        if generator is not None:
            kwargs = {**kwargs, "generator": generator}
    out = func(*args, **kwargs)
    mode.record("sample", out.detach().clone())
    return out


# ------------------------------------------------------------- opaque draws
_RNNS = (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)


def _draws_inside(func, args, kwargs) -> bool:
    """Whether this call draws random numbers where no generator can be given:
    inside an ATen kernel, or inside a Python function of ``torch.nn.functional``
    whose own torch-function dispatch hides its inner calls from the tape."""
    if func is F.scaled_dot_product_attention:
        return float(_arg(args, kwargs, 4, "dropout_p", 0.0)) > 0
    if func is F.multi_head_attention_forward:  # nn.MultiheadAttention: F.dropout or SDPA dropout inside
        return float(_arg(args, kwargs, 10, "dropout_p", 0.0)) > 0 and bool(_arg(args, kwargs, 13, "training", True))
    if func is F.rrelu:
        return bool(_arg(args, kwargs, 3, "training", False))
    if func is F.gumbel_softmax:
        return True
    # RNN (input, hx, params, has_biases, num_layers, dropout, train, ...); packed: (data, batch_sizes, hx, ...)
    packed = isinstance(args[1], Tensor) and args[1].dim() == 1 and args[1].dtype == torch.int64
    i = 6 if packed else 5
    return len(args) > i + 1 and float(args[i]) > 0 and bool(args[i + 1])


def _opaque(mode: _TapeMode, func, args, kwargs):
    if func not in _DROPOUTS and not _draws_inside(func, args, kwargs):
        return func(*args, **kwargs)
    device = _device_of(args, kwargs)
    if _is_capturing(device):
        raise RuntimeError(f"ater_ext: {getattr(func, '__name__', func)} draws random numbers that the extra passes "
                           f"replay through the CUDA generator's state, which cannot be read while a CUDA graph is "
                           f"captured; turn that dropout off for a captured step (or run the step eagerly)")
    if mode.replay:
        state = mode.next_entry("global state", func)
        with mode.tape.global_state(device, state):
            return func(*args, **kwargs)
    with mode.tape.global_state(device, None) as start:
        out = func(*args, **kwargs)
    mode.record("global state", start)
    return out


_HANDLERS: Dict[Callable, Callable] = {
    **{f: _dropout for f in _DROPOUTS},
    **{f: _sampler for f in SAMPLERS},
    **{f: _opaque for f in (F.scaled_dot_product_attention, F.multi_head_attention_forward, F.rrelu,
                            F.gumbel_softmax, *_RNNS)},
}
