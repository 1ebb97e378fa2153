"""Helpers shared by the command-line tools: one-line errors, devices, seeds,
checkpoints and result files."""
from __future__ import annotations

import logging
import os
import platform
import random
import sys
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..atomic_io import save_torch, write_csv, write_json, write_text  # noqa: F401  (the CLI's writers)

log = logging.getLogger("ater_ext")


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


def run_cli(prog: str, main: Callable[[Optional[Sequence[str]]], int], argv=None) -> int:
    """Runs ``main`` turning expected failures into ``prog: error: message`` and exit code 2."""
    from ..data import DataError  # the data layer's user-facing error

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return main(argv)
    except (CliError, DataError, ValueError, OSError) as exc:
        print(f"{prog}: error: {first_line(exc)}", file=sys.stderr)
        return 2


def progress(iterable=None, *, quiet: bool = False, **kwargs):
    """A tqdm bar that clears itself when closed and stays silent when stderr is
    not a terminal (logs, CI, pipes) or when ``quiet``; use it as a context
    manager so that an exception also clears it."""
    return tqdm(iterable, disable=True if quiet else None, leave=False, dynamic_ncols=True, **kwargs)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(f"must be >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = float(text)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"must be finite and > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"must be finite and >= 0, got {text}")
    return value


def float_list(text: str) -> List[float]:
    """argparse type: comma-separated non-negative floats."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not np.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"expected comma-separated non-negative numbers, got {text!r}")
    return values


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, else its type's name."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


DEVICE_TYPES = ("cpu", "cuda")


def pick_device(name: Optional[str]) -> torch.device:
    """``--device``: cpu, cuda or cuda:N (default cuda when available, else cpu)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise CliError(f"--device {name!r} is not a device name ({first_line(exc)}); use cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise CliError(f"--device {name}: ater_ext runs on {' or '.join(DEVICE_TYPES)}, got a {device.type} device")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def machine_name() -> str:
    """A readable name of this machine: the GPU, else the CPU model and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def spread_subset(n_total: int, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of a fixed random subset of size ``min(n, n_total)``, in a fixed random
    order: test sets are often sorted by class, so neither their first ``n``
    samples nor the first ``m`` of a sorted subset are representative, while
    every prefix of this order is."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


def rng_state() -> Dict[str, object]:
    """Every RNG a training run draws from, as tensors (loadable with weights_only=True)."""
    state: Dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "rng", "config", "history", "best_error")


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by ater-train; weights_only=True, so a file from elsewhere cannot run code."""
    if not os.path.isfile(path):
        raise CliError(f"checkpoint {path} not found")
    if os.path.getsize(path) == 0:
        raise CliError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise CliError(f"cannot read checkpoint {path}: {first_line(exc)}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CliError(f"{path} is not an ater-train checkpoint (missing {', '.join(missing)})")
    _check_checkpoint_fields(path, state)
    return state


def _check_checkpoint_fields(path: str, state: dict) -> None:
    """The fields a resume or an evaluation reads have the types and ranges ater-train writes."""
    def bad(what: str) -> CliError:
        return CliError(f"{path} is not a valid ater-train checkpoint ({what})")

    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise bad(f"epoch must be an integer >= 1, got {epoch!r}")
    if not isinstance(state["config"], dict):
        raise bad(f"config must be a dict, got {type(state['config']).__name__}")
    history = state["history"]
    if not isinstance(history, list) or len(history) != epoch or not all(isinstance(r, dict) for r in history):
        raise bad(f"history must list one row per epoch ({epoch}), got "
                  f"{len(history) if isinstance(history, list) else type(history).__name__}")
    for key in ("model", "optimizer"):
        if not isinstance(state[key], dict):
            raise bad(f"{key} must be a state dict, got {type(state[key]).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise bad("model holds values that are not tensors")
    best = state["best_error"]
    if isinstance(best, bool) or not isinstance(best, (int, float)):
        raise bad(f"best_error must be a number, got {best!r}")
