"""The ``output=`` option: which part of a model's output holds the logits.

Every ater_ext function that calls a model (``energy_reg``, ``x_max``, the
objectives, the attacks, ``metrics.energy``) takes ``output=`` and resolves it
with :func:`resolve_output` in one place (the extra passes' forward and the
objectives' clean forward):

* ``None`` (default): the model returns the logits tensor itself; any other
  output (a tuple, a dict, a Hugging Face ``ModelOutput``) is refused with an
  error that names ``output=``.
* a ``str``: a key (``output="logits"`` for ``{"logits": ...}`` and for a
  ``ModelOutput``, which is a dict with attribute access), or else an attribute.
* an ``int``: an index (``output=0`` for ``(logits, features)``; a
  ``ModelOutput`` indexes its non-``None`` fields, as in transformers).
* a callable: ``output=lambda out: out["logits"][:, -1]``, any map from the
  model's output to the logits.

Code that runs a model itself (e.g. a command line's accuracy loop) uses the
same resolver: ``logits = resolve_output(spec, op="my_eval")(model(x))``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

from torch import Tensor

__all__ = ["OutputSpec", "resolve_output", "describe_output"]

OutputSpec = Optional[Union[str, int, Callable[[Any], Tensor]]]


def describe_output(out: Any) -> str:
    """A short description of a model output for error messages (type, keys or length)."""
    kind = type(out).__name__
    if isinstance(out, Tensor):
        return f"a tensor {list(out.shape)}"
    if isinstance(out, Mapping):
        return f"a {kind} with keys {list(out.keys())}"
    if isinstance(out, Sequence) and not isinstance(out, str):
        return f"a {kind} of length {len(out)}"
    return f"a {kind}"


def _hint(out: Any) -> str:
    if isinstance(out, Mapping):
        key = "logits" if "logits" in out else next(iter(out), "logits")
        return f"output={key!r} (a key)"
    if isinstance(out, Sequence) and not isinstance(out, str):
        return "output=0 (an index)"
    return "output=<callable mapping the output to the logits>"


def _check_logits(op: str, spec: OutputSpec, raw: Any, logits: Any) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"ater_ext.{op}: output={spec!r} picked {describe_output(logits)} out of the model's "
                        f"output ({describe_output(raw)}); it must pick the logits tensor")
    return logits


def resolve_output(output: OutputSpec = None, *, op: str = "resolve_output") -> Callable[[Any], Tensor]:
    """The function ``model_output -> logits`` that ``output=`` describes (see the module docstring).

    ``op`` names the calling function in error messages. A bad ``output``
    itself (a float, a bool) raises ``ValueError`` here; a model output that
    ``output`` cannot pick the logits from raises ``TypeError`` when it is seen.
    """
    if output is None:
        def plain(raw: Any) -> Tensor:
            if isinstance(raw, Tensor):
                return raw
            raise TypeError(f"ater_ext.{op}: the model returned {describe_output(raw)}, not a logits tensor; "
                            f"pass output= to say where the logits are, e.g. {_hint(raw)}, an index, or a "
                            f"callable mapping the model's output to the logits")
        return plain
    if isinstance(output, bool) or not (isinstance(output, (str, int)) or callable(output)):
        raise ValueError(f"ater_ext.{op}: output must be None, a key (str), an index (int) or a callable, "
                         f"got {output!r}")
    if callable(output):
        return lambda raw: _check_logits(op, output, raw, output(raw))
    if isinstance(output, str):
        def by_key(raw: Any) -> Tensor:
            if isinstance(raw, Mapping):
                if output not in raw:
                    raise TypeError(f"ater_ext.{op}: output={output!r} is not a key of the model's output "
                                    f"({describe_output(raw)})")
                return _check_logits(op, output, raw, raw[output])
            if not hasattr(raw, output):
                raise TypeError(f"ater_ext.{op}: output={output!r} is neither a key nor an attribute of the "
                                f"model's output ({describe_output(raw)})")
            return _check_logits(op, output, raw, getattr(raw, output))
        return by_key

    def by_index(raw: Any) -> Tensor:
        # a ModelOutput is a Mapping that indexes its fields by position itself
        if isinstance(raw, Tensor) or (isinstance(raw, Mapping) and not hasattr(raw, "to_tuple")):
            raise TypeError(f"ater_ext.{op}: output={output!r} is an index, but the model returned "
                            f"{describe_output(raw)}; {'use a key' if isinstance(raw, Mapping) else 'drop output='}")
        try:
            picked = raw[output]
        except (IndexError, TypeError, KeyError) as exc:
            raise TypeError(f"ater_ext.{op}: cannot take output={output!r} of the model's output "
                            f"({describe_output(raw)}): {exc}") from None
        return _check_logits(op, output, raw, picked)
    return by_index
