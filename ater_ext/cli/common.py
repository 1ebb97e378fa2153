"""Helpers shared by the command-line tools: one-line errors, devices, seeds,
checkpoints and result files."""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import random
import sys
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

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
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


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


def float_list(text: str) -> List[float]:
    """argparse type: comma-separated non-negative floats."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not np.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"expected comma-separated non-negative numbers, got {text!r}")
    return values


def pick_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available on this machine")
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
    """Indices of a fixed random subset of size ``n`` (test sets are often sorted by class,
    so their first ``n`` samples are not representative)."""
    if n >= n_total:
        return torch.arange(n_total)
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise CliError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CliError(f"{path} is not an ater-train checkpoint (missing {', '.join(missing)})")
    return state


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_csv(path: str, rows: List[Dict[str, object]]) -> None:
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
