"""Helpers of the command-line tests: run a tool in-process like its console
script, read its outputs, and assert one-line errors."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from ater_ext.cli import evaluate, train
from ater_ext.cli.common import run_cli

DIGITS = ["--dataset", "digits", "--device", "cpu"]


def _call(prog: str, main, argv: Sequence[str], capsys) -> Tuple[int, str, str]:
    """Runs a tool in-process like its console script: (exit code, stdout, stderr).

    argparse's own errors (and --help) leave through SystemExit; the code is returned."""
    capsys.readouterr()  # drop whatever came before
    try:
        rc = run_cli(prog, main, [str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return rc, out, err


def train_cli(argv, capsys):
    return _call("ater-train", train.main, argv, capsys)


def eval_cli(argv, capsys):
    return _call("ater-eval", evaluate.main, argv, capsys)


def _error_line(prog: str, err: str) -> str:
    """The single ``prog: error: ...`` line of stderr; fails on a traceback or several error lines."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, f"expected one '{prog}: error:' line, got stderr:\n{err}"
    assert lines[-1] == errors[0], f"the error must be the last line of stderr:\n{err}"
    return errors[0]


def assert_one_line_error(prog: str, rc: int, err: str, *needles: str) -> str:
    """Exit code 2 and a one-line ``prog: error: ...`` message (the whole of stderr) naming each needle."""
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    line = _error_line(prog, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr must be one line, got:\n{err}"
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def assert_argparse_error(prog: str, rc: int, err: str, *needles: str) -> str:
    """argparse's rejection: exit 2, usage then one ``prog: error:`` line naming the needles, no traceback."""
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    line = _error_line(prog, err)
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def read_metrics(out: Path) -> dict:
    with open(out / "metrics.json") as f:
        return json.load(f)


def read_csv(path: Path) -> Tuple[List[str], List[Dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def torch_rng(state: dict) -> torch.Tensor:
    """The CPU generator state of a checkpoint: ``rng`` is one state dict, or one per process (rank 0 first)."""
    rng = state["rng"]
    if isinstance(rng, (list, tuple)):
        assert len(rng) >= 1
        rng = rng[0]
    assert isinstance(rng, dict), type(rng)
    return rng["torch"]


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def assert_state_dicts_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs (max |diff| {(a[k].double() - b[k].double()).abs().max()})"


def assert_nested_equal(a, b, where="") -> None:
    """Bit-identical nested containers of tensors / numbers (optimizer state dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_nested_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
