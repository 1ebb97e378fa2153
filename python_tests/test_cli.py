"""The command-line tools ``ater-train`` and ``ater-eval`` (SPEC.md section 2, "Command line").

Everything runs on CPU on scikit-learn's ``digits`` (1433 train / 364 test 8x8
images, no download) or on a tiny MNIST-layout idx dataset written here, with
1-2 epochs and small models, so the whole file stays well under the test
budget. The tools are called in-process through ``run_cli`` (the function the
console scripts call), and once as real subprocesses to check the exit code and
the one-line, traceback-free error on stderr.
"""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch

from _cli_common import (DIGITS, assert_argparse_error, assert_nested_equal, assert_one_line_error,
                         assert_state_dicts_equal, eval_cli, finite, load_ckpt, read_csv, read_metrics, torch_rng,
                         train_cli)
from ater_ext.cli import evaluate, train
from ater_ext.models import build_model

REPO = Path(__file__).resolve().parents[1]
METHODS = ("erm", "at", "vat", "ater", "vater")
SEMI = ("vat", "vater")
CHECKPOINT_KEYS = {"model", "optimizer", "epoch", "rng", "config"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------- MNIST-layout idx files
def _idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, labels.shape[0]) + labels.astype(np.uint8).tobytes()


def write_mnist(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Dict[str, Path]:
    """A tiny dataset in torchvision's MNIST layout: ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.

    Each image is a bright square whose position encodes the label, so it is learnable."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    paths = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 5)
            images[i, 4 + 10 * r:12 + 10 * r, 2 + 5 * col:6 + 5 * col] = 255
        paths[f"{prefix}-images"] = raw / f"{prefix}-images-idx3-ubyte"
        paths[f"{prefix}-labels"] = raw / f"{prefix}-labels-idx1-ubyte"
        paths[f"{prefix}-images"].write_bytes(_idx_images(images))
        paths[f"{prefix}-labels"].write_bytes(_idx_labels(labels))
    return paths


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread is as fast, and far steadier on a shared,
    busy machine (no OpenMP barrier waiting for a descheduled sibling thread). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------- shared runs
class Runs:
    """Training runs shared by several tests (trained once per module, on demand)."""

    def __init__(self, root: Path):
        self.root = root
        self._done: Dict[str, Tuple[Path, int, str]] = {}

    def get(self, name: str, argv: Sequence[str], capsys) -> Tuple[Path, int, str]:
        if name not in self._done:
            out = self.root / name
            rc, _, err = train_cli([*argv, "--out", out], capsys)
            self._done[name] = (out, rc, err)
        return self._done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("cli_runs"))


def method_argv(method: str) -> List[str]:
    argv = ["--method", method, *DIGITS, "--model", "lenet", "--epochs", "1"]
    if method in SEMI:
        argv += ["--labels", "100"]
    return argv


def trained(runs: Runs, method: str, capsys, with_err: bool = False):
    out, rc, err = runs.get(method, method_argv(method), capsys)
    assert rc == 0, f"ater-train --method {method} failed (exit {rc}):\n{err}"
    return (out, err) if with_err else out


# An ERM LeNet trained enough (74 % test accuracy) for the attacks to bite.
ROBUST_EVAL_ARGV = ["--method", "erm", *DIGITS, "--model", "lenet", "--epochs", "1", "--lr", "0.01",
                    "--batch-size", "32"]


# ---------------------------------------------------------- end to end
@pytest.mark.parametrize("method", METHODS)
def test_train_end_to_end_digits(method, runs, capsys):
    out, err = trained(runs, method, capsys, with_err=True)

    # metrics.json: {"config": {...}, "epochs": [{"epoch": 1, "train_loss": ..., "test_error": ..., ...}]}
    metrics = read_metrics(out)
    assert set(metrics) >= {"config", "epochs"}
    config = metrics["config"]
    assert isinstance(config, dict)
    assert config["method"] == method and config["dataset"] == "digits" and config["model"] == "lenet"
    assert config["epochs"] == 1 and config["seed"] == 0
    assert config["labels"] == (100 if method in SEMI else None)
    epochs = metrics["epochs"]
    assert isinstance(epochs, list) and len(epochs) == 1
    row = epochs[0]
    assert row["epoch"] == 1
    assert isinstance(row["train_loss"], float) and math.isfinite(row["train_loss"]) and row["train_loss"] > 0
    assert isinstance(row["test_error"], float) and 0.0 <= row["test_error"] <= 100.0
    # test_error is in percent of the 364 digits test images
    assert abs(row["test_error"] * 364 / 100 - round(row["test_error"] * 364 / 100)) < 1e-6
    assert f"{method} epoch 1/1" not in err, "a progress bar on a stderr that is not a terminal"
    assert "seconds" in row and finite(row["seconds"]) and row["seconds"] >= 0
    energy_keys = [k for k in row if "energy" in k and not k.startswith("train_")]
    assert energy_keys, f"no energy statistics in {sorted(row)}"
    for k, v in row.items():
        assert finite(v), f"{k} = {v!r} is not a finite number"

    # metrics.csv: the same rows, the same columns as the JSON epoch dicts
    columns, rows = read_csv(out / "metrics.csv")
    assert columns == list(row.keys())
    assert len(rows) == len(epochs)
    for json_row, csv_row in zip(epochs, rows):
        for k, v in json_row.items():
            assert float(csv_row[k]) == pytest.approx(v, rel=1e-12, abs=0), k

    # last.pt and best.pt, loadable with weights_only=True
    for name in ("last.pt", "best.pt"):
        path = out / name
        assert path.is_file(), f"{path} missing"
        state = load_ckpt(path)
        assert CHECKPOINT_KEYS <= set(state), sorted(state)
        assert state["epoch"] == 1
        assert state["config"]["method"] == method and state["config"]["model"] == "lenet"
        assert isinstance(torch_rng(state), torch.Tensor) and torch_rng(state).dtype == torch.uint8
        assert isinstance(state["optimizer"], dict) and "state" in state["optimizer"]
        model = build_model("lenet", (1, 8, 8), 10)
        model.load_state_dict(state["model"])  # strict: every parameter is there
        assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_train_mnist_idx_files(tmp_path, capsys):
    """--dataset mnist --data-dir DIR reads torchvision's raw idx layout (files written here)."""
    write_mnist(tmp_path / "data", n_train=60, n_test=20)
    out = tmp_path / "out"
    rc, _, err = train_cli(["--method", "erm", "--dataset", "mnist", "--data-dir", tmp_path / "data",
                            "--model", "lenet", "--epochs", "1", "--batch-size", "20", "--device", "cpu",
                            "--val-size", "10", "--out", out], capsys)
    assert rc == 0, err
    metrics = read_metrics(out)
    assert metrics["config"]["dataset"] == "mnist"
    (row,) = metrics["epochs"]
    assert row["epoch"] == 1 and math.isfinite(row["train_loss"])
    assert 0 <= row["test_error"] <= 100
    assert abs(row["test_error"] * 20 / 100 - round(row["test_error"] * 20 / 100)) < 1e-6  # 20 test images
    assert (out / "metrics.csv").is_file() and (out / "last.pt").is_file() and (out / "best.pt").is_file()
    model = build_model("lenet", (1, 28, 28), 10)
    model.load_state_dict(load_ckpt(out / "last.pt")["model"])


def test_train_amp_on_cpu(tmp_path, capsys):
    """--amp on CPU (bf16 autocast) trains and writes finite metrics."""
    rc, _, err = train_cli(["--method", "erm", *DIGITS, "--model", "lenet", "--epochs", "1", "--amp",
                            "--out", tmp_path], capsys)
    assert rc == 0, err
    (row,) = read_metrics(tmp_path)["epochs"]
    assert math.isfinite(row["train_loss"]) and 0 <= row["test_error"] <= 100


# ------------------------------------------------------------- resume
RESUME_CASES = {
    "erm-lenet": ["--method", "erm", "--model", "lenet"],
    "ater-mlp": ["--method", "ater", "--model", "mlp"],  # BatchNorm running stats, energy term
    "vater-lenet": ["--method", "vater", "--model", "lenet", "--labels", "100"],  # unlabelled stream, VAT noise
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_identical(case, tmp_path, capsys):
    base = [*RESUME_CASES[case], *DIGITS, "--epochs", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"

    rc, _, err = train_cli([*base, "--out", straight], capsys)
    assert rc == 0, err
    rc, _, err = train_cli([*base, "--stop-after", "1", "--out", split], capsys)
    assert rc == 0, err
    half = read_metrics(split)
    assert [r["epoch"] for r in half["epochs"]] == [1]
    assert load_ckpt(split / "last.pt")["epoch"] == 1
    torch.manual_seed(1234)  # a resumed run must not depend on the caller's RNG state
    rc, _, err = train_cli([*base, "--resume", "--out", split], capsys)
    assert rc == 0, err

    a, b = load_ckpt(straight / "last.pt"), load_ckpt(split / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    assert_state_dicts_equal(a["model"], b["model"])
    assert_nested_equal(a["optimizer"], b["optimizer"], "optimizer")
    assert torch.equal(torch_rng(a), torch_rng(b))

    ma, mb = read_metrics(straight), read_metrics(split)
    assert [r["epoch"] for r in ma["epochs"]] == [r["epoch"] for r in mb["epochs"]] == [1, 2]
    for ra, rb in zip(ma["epochs"], mb["epochs"]):
        assert ra["test_error"] == rb["test_error"]
        assert ra.keys() == rb.keys()
        for k in ra:
            if not k.endswith("seconds"):
                assert ra[k] == rb[k], f"epoch {ra['epoch']} {k}: {ra[k]} (straight) != {rb[k]} (resumed)"
    _, rows = read_csv(split / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]

    # best.pt holds the epoch with the lowest validation error (never chosen on the test set)
    errors = [r["val_error"] for r in mb["epochs"]]
    best_epoch = 1 + errors.index(min(errors))
    assert load_ckpt(split / "best.pt")["epoch"] == best_epoch


@pytest.mark.parametrize("change, needle", [
    (["--lr", "0.01"], "lr"),
    (["--method", "at"], "method"),
    (["--seed", "1"], "seed"),
    (["--eps", "1.5"], "eps"),
])
def test_resume_with_other_settings_is_refused(change, needle, runs, capsys):
    base = ["--method", "erm", *DIGITS, "--model", "lenet", "--epochs", "2"]
    out, rc, err = runs.get("resume-base", [*base, "--stop-after", "1"], capsys)
    assert rc == 0, err
    before = (out / "last.pt").read_bytes()
    argv = [*base, "--resume", "--out", out]
    for i in range(0, len(change), 2):  # replace the option if present, else append it
        if change[i] in argv:
            argv[argv.index(change[i]) + 1] = change[i + 1]
        else:
            argv += change[i:i + 2]
    rc, _, err = train_cli(argv, capsys)
    line = assert_one_line_error("ater-train", rc, err, "--resume")
    assert needle in line.split("settings", 1)[-1], line
    assert (out / "last.pt").read_bytes() == before, "a refused --resume must leave the checkpoint alone"


def test_resume_without_checkpoint(tmp_path, capsys):
    rc, _, err = train_cli(["--method", "erm", *DIGITS, "--model", "lenet", "--epochs", "1", "--resume",
                            "--out", tmp_path / "empty"], capsys)
    assert_one_line_error("ater-train", rc, err, "last.pt")


# ---------------------------------------------------------- bad input
def test_mnist_without_data_dir(tmp_path, capsys):
    rc, _, err = train_cli(["--method", "erm", "--dataset", "mnist", "--device", "cpu", "--out", tmp_path],
                           capsys)
    assert_one_line_error("ater-train", rc, err, "--data-dir")


def test_mnist_missing_files(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    rc, _, err = train_cli(["--method", "erm", "--dataset", "mnist", "--data-dir", missing, "--model", "lenet",
                            "--device", "cpu", "--out", tmp_path / "out"], capsys)
    assert_one_line_error("ater-train", rc, err,
                          str(missing / "MNIST" / "raw" / "train-images-idx3-ubyte"))


def test_mnist_one_file_missing(tmp_path, capsys):
    paths = write_mnist(tmp_path / "data")
    paths["t10k-labels"].unlink()
    rc, _, err = train_cli(["--method", "erm", "--dataset", "mnist", "--data-dir", tmp_path / "data",
                            "--model", "lenet", "--device", "cpu", "--out", tmp_path / "out"], capsys)
    assert_one_line_error("ater-train", rc, err, str(paths["t10k-labels"]))


@pytest.mark.parametrize("corruption", ["truncated-train-images", "truncated-test-labels", "bad-magic",
                                        "label-out-of-range"])
def test_mnist_corrupt_file(corruption, tmp_path, capsys):
    paths = write_mnist(tmp_path / "data")
    if corruption == "truncated-train-images":
        bad = paths["train-images"]
        bad.write_bytes(bad.read_bytes()[:16 + 28 * 28 * 3 + 100])  # valid header (60 images), data cut short
    elif corruption == "truncated-test-labels":
        bad = paths["t10k-labels"]
        bad.write_bytes(bad.read_bytes()[:8 + 5])
    elif corruption == "bad-magic":
        bad = paths["train-labels"]
        data = bytearray(bad.read_bytes())
        data[:4] = struct.pack(">I", 1234)
        bad.write_bytes(bytes(data))
    else:
        bad = paths["train-labels"]
        data = bytearray(bad.read_bytes())
        data[8] = 12
        bad.write_bytes(bytes(data))
    rc, _, err = train_cli(["--method", "erm", "--dataset", "mnist", "--data-dir", tmp_path / "data",
                            "--model", "lenet", "--device", "cpu", "--out", tmp_path / "out"], capsys)
    assert_one_line_error("ater-train", rc, err, str(bad))


def test_unknown_method_is_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--method", "sgd", *DIGITS, "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert_argparse_error("ater-train", 2, err, "--method", "sgd")


@pytest.mark.parametrize("argv, needles", [
    (["--eps", "0"], ("--eps",)),
    (["--eps", "-1"], ("--eps",)),
    (["--eps", "nan"], ("--eps",)),
    (["--eps", "inf"], ("--eps",)),
    (["--lr", "0"], ("--lr",)),
    (["--lam", "-0.1"], ("--lam",)),
    (["--eps-adv", "0"], ("--eps-adv",)),
    (["--eps-vat", "-2"], ("--eps-vat",)),
    (["--xi", "0"], ("--xi",)),
    (["--dataset", "imagenet"], ("--dataset",)),
    (["--model", "resnet"], ("--model",)),
    (["--epochs", "two"], ("--epochs",)),
])
def test_rejected_by_argparse(argv, needles, tmp_path, capsys):
    rc, _, err = train_cli(["--method", "erm", *DIGITS, *argv, "--out", tmp_path], capsys)
    assert_argparse_error("ater-train", rc, err, *needles)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("argv, needles", [
    (["--epochs", "0"], ("--epochs",)),
    (["--epochs", "-3"], ("--epochs",)),
    (["--batch-size", "0"], ("--batch-size",)),
    (["--labels", "0"], ("--labels",)),
    (["--labels", "5000"], ("--labels", "5000")),
    (["--labels", "105"], ("105",)),  # not a multiple of the 10 classes: no balanced split
])
def test_rejected_settings(argv, needles, tmp_path, capsys):
    rc, _, err = train_cli(["--method", "vat", *DIGITS, "--model", "lenet", "--epochs", "1", *argv,
                            "--out", tmp_path / "out"], capsys)
    assert_one_line_error("ater-train", rc, err, *needles)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_sync_bn_on_cpu(tmp_path, capsys):
    rc, _, err = train_cli(["--method", "erm", *DIGITS, "--model", "lenet", "--epochs", "1", "--sync-bn",
                            "--out", tmp_path], capsys)
    line = assert_one_line_error("ater-train", rc, err, "--sync-bn")
    assert "CUDA" in line or "GPU" in line or "torchrun" in line, line


def test_cuda_device_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc, _, err = train_cli(["--method", "erm", "--dataset", "digits", "--device", "cuda", "--out", tmp_path],
                           capsys)
    assert_one_line_error("ater-train", rc, err, "cuda")


# ------------------------------------------------------ real subprocesses
def _subprocess(module: str, argv: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_subprocess_train_error_is_one_line(tmp_path):
    """The console entry point: exit status 2 and exactly one line on stderr, no traceback."""
    missing = tmp_path / "no-data"
    proc = _subprocess("ater_ext.cli.train", ["--method", "erm", "--dataset", "mnist", "--data-dir", missing,
                                              "--device", "cpu", "--out", tmp_path / "out"], REPO)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ater-train: error: ")
    assert str(missing / "MNIST" / "raw" / "train-images-idx3-ubyte") in lines[0]


def test_subprocess_argparse_error_exit_code(tmp_path):
    proc = _subprocess("ater_ext.cli.evaluate", ["--checkpoint", tmp_path / "none.pt", "--attacks", "fgsm",
                                                 "--eps-list", "1,-2", "--out", tmp_path], REPO)
    assert proc.returncode == 2, proc.stderr
    assert_argparse_error("ater-eval", 2, proc.stderr, "--eps-list")


# ----------------------------------------------------------- ater-eval
def test_eval_two_checkpoints(runs, tmp_path, capsys):
    robust_out, rc, err = runs.get("eval-erm", ROBUST_EVAL_ARGV, capsys)
    assert rc == 0, err
    ckpts = [robust_out / "best.pt", trained(runs, "ater", capsys) / "best.pt"]
    out = tmp_path / "eval"
    rc, stdout, err = eval_cli(["--checkpoint", *ckpts, "--limit", "50", "--steps", "2", "--eps-list", "0,1",
                                "--linf-eps-list", "0,0.1", "--device", "cpu", "--out", out], capsys)
    assert rc == 0, err

    with open(out / "robustness.json") as f:
        report = json.load(f)
    results = report["results"]
    assert [r["checkpoint"] for r in results] == [str(c) for c in ckpts]
    assert [r["method"] for r in results] == ["erm", "ater"]
    expected_eps = {"fgsm": [0.0, 0.1], "pgd-l2": [0.0, 1.0], "pgd-linf": [0.0, 0.1]}
    for r in results:
        assert r["n_test"] == 50
        clean = r["clean_accuracy"]
        assert 0 <= clean <= 100
        assert abs(clean * 50 / 100 - round(clean * 50 / 100)) < 1e-6  # a count out of 50
        assert set(r["attacks"]) == set(expected_eps)
        for attack, points in r["attacks"].items():
            assert [p["eps"] for p in points] == expected_eps[attack], attack
            for p in points:
                assert 0 <= p["accuracy"] <= 100
                if p["eps"] == 0:
                    assert p["accuracy"] == clean, attack
                else:  # an attack may not make the model more accurate (one lucky flip of 50 allowed)
                    assert p["accuracy"] <= clean + 2.0 + 1e-9, (attack, p, clean)
        energy = r["energy"]
        for k in ("E_B", "E_eps"):
            assert finite(energy[k]) and energy[k] > 0, (k, energy)
        assert r["checkpoint"] in stdout

    # the trained ERM model (74 % accurate) loses accuracy under each attack
    erm = results[0]
    assert erm["clean_accuracy"] >= 40, erm["clean_accuracy"]
    for attack, points in erm["attacks"].items():
        assert points[-1]["accuracy"] < erm["clean_accuracy"], (attack, points)

    # robustness.csv: one row per (checkpoint, attack, eps), the same numbers
    columns, rows = read_csv(out / "robustness.csv")
    assert {"checkpoint", "attack", "eps", "accuracy"} <= set(columns)
    expected = {(r["checkpoint"], a, p["eps"]): p["accuracy"] for r in results for a, pts in r["attacks"].items()
                for p in pts}
    assert len(rows) == len(expected) == 2 * 6
    for row in rows:
        key = (row["checkpoint"], row["attack"], float(row["eps"]))
        assert key in expected, key
        assert float(row["accuracy"]) == pytest.approx(expected[key], abs=1e-9)

    # robustness.png: a real PNG image
    png = out / "robustness.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image as mpimg

    image = mpimg.imread(str(png))
    assert image.ndim == 3 and image.shape[0] >= 100 and image.shape[1] >= 100
    assert float(np.asarray(image).std()) > 0  # not a blank canvas


def test_eval_unknown_attack(runs, tmp_path, capsys):
    ckpt = trained(runs, "erm", capsys) / "best.pt"
    rc, _, err = eval_cli(["--checkpoint", ckpt, "--attacks", "fgsm,cw", "--device", "cpu", "--out", tmp_path],
                          capsys)
    assert_one_line_error("ater-eval", rc, err, "cw")


def test_eval_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope" / "best.pt"
    rc, _, err = eval_cli(["--checkpoint", missing, "--device", "cpu", "--out", tmp_path / "eval"], capsys)
    assert_one_line_error("ater-eval", rc, err, str(missing))


def test_eval_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint\n" * 10)
    rc, _, err = eval_cli(["--checkpoint", bad, "--device", "cpu", "--out", tmp_path / "eval"], capsys)
    assert_one_line_error("ater-eval", rc, err, str(bad))


class _Payload:
    """Unpickling this would create ``path``: a checkpoint from elsewhere trying to run code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_eval_checkpoint_cannot_run_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(str(marker)), "epoch": 1}, evil)
    rc, _, err = eval_cli(["--checkpoint", evil, "--device", "cpu", "--out", tmp_path / "eval"], capsys)
    assert_one_line_error("ater-eval", rc, err, str(evil))
    assert not marker.exists(), "loading a checkpoint ran code (weights_only=True not honoured)"


def test_eval_rejects_negative_eps(tmp_path, capsys):
    rc, _, err = eval_cli(["--checkpoint", tmp_path / "x.pt", "--linf-eps-list", "0,-0.1", "--out", tmp_path],
                          capsys)
    assert_argparse_error("ater-eval", rc, err, "--linf-eps-list")


@pytest.mark.parametrize("argv, needle", [
    (["--limit", "0"], "--limit"),  # no test samples: accuracy would be 0 / 0
    (["--limit", "-5"], "--limit"),  # a negative count is no count
    (["--batch-size", "0"], "--batch-size"),
])
def test_eval_rejects_bad_counts(argv, needle, runs, tmp_path, capsys):
    ckpt = trained(runs, "erm", capsys) / "best.pt"
    rc, _, err = eval_cli(["--checkpoint", ckpt, "--eps-list", "0,1", "--linf-eps-list", "0,0.1", "--steps", "1",
                           "--device", "cpu", *argv, "--out", tmp_path / "eval"], capsys)
    assert_argparse_error("ater-eval", rc, err, needle)  # rejected while parsing, naming the option
    assert not (tmp_path / "eval" / "robustness.json").exists()


def test_eval_foreign_checkpoint(tmp_path, capsys):
    """A loadable .pt that ater-train did not write (a bare state_dict) is a one-line error, not a KeyError."""
    plain = tmp_path / "plain.pt"
    torch.save(build_model("lenet", (1, 8, 8), 10).state_dict(), plain)
    rc, _, err = eval_cli(["--checkpoint", plain, "--device", "cpu", "--out", tmp_path / "eval"], capsys)
    assert_one_line_error("ater-eval", rc, err, str(plain))


def test_resume_foreign_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    torch.save(build_model("lenet", (1, 8, 8), 10).state_dict(), out / "last.pt")
    rc, _, err = train_cli(["--method", "erm", *DIGITS, "--model", "lenet", "--epochs", "1", "--resume",
                            "--out", out], capsys)
    assert_one_line_error("ater-train", rc, err, str(out / "last.pt"))


def test_resume_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.pt").write_bytes(b"\x00garbage" * 50)
    rc, _, err = train_cli(["--method", "erm", *DIGITS, "--model", "lenet", "--epochs", "1", "--resume",
                            "--out", out], capsys)
    assert_one_line_error("ater-train", rc, err, str(out / "last.pt"))


@pytest.mark.parametrize("tool", ["ater-train", "ater-eval"])
def test_out_is_an_existing_file(tool, runs, tmp_path, capsys):
    not_a_dir = tmp_path / "results.txt"
    not_a_dir.write_text("a file, not a folder\n")
    if tool == "ater-train":
        rc, _, err = train_cli(["--method", "erm", *DIGITS, "--model", "lenet", "--epochs", "1",
                                "--out", not_a_dir], capsys)
    else:
        ckpt = trained(runs, "erm", capsys) / "best.pt"
        rc, _, err = eval_cli(["--checkpoint", ckpt, "--device", "cpu", "--out", not_a_dir], capsys)
    assert_one_line_error(tool, rc, err, str(not_a_dir))


# --------------------------------------------------------------- --help
TRAIN_OPTIONS = ("--method", "--dataset", "--data-dir", "--model", "--labels", "--epochs", "--batch-size", "--lr",
                 "--eps", "--eps-adv", "--eps-vat", "--lam", "--xi", "--seed", "--device", "--amp", "--sync-bn",
                 "--out", "--resume")
EVAL_OPTIONS = ("--checkpoint", "--attacks", "--eps-list", "--out")


def _help_options(text: str) -> set:
    import re

    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


def test_train_help_lists_spec_options(capsys):
    rc, out, err = train_cli(["--help"], capsys)
    assert rc == 0, err
    assert out.startswith("usage: ater-train")
    found = _help_options(out)
    missing = [o for o in TRAIN_OPTIONS if o not in found]
    assert not missing, f"ater-train --help lacks {missing}"
    for choice in (*METHODS, "mnist-5k", "digits", "mnist", "fashion-mnist", "cifar10", "svhn", "mlp",
                   "conv-large", "lenet"):
        assert choice in out, choice


def test_eval_help_lists_spec_options(capsys):
    rc, out, err = eval_cli(["--help"], capsys)
    assert rc == 0, err
    assert out.startswith("usage: ater-eval")
    found = _help_options(out)
    missing = [o for o in EVAL_OPTIONS if o not in found]
    assert not missing, f"ater-eval --help lacks {missing}"
    for attack in ("fgsm", "pgd-l2", "pgd-linf"):
        assert attack in out


def test_console_scripts_declared():
    """pyproject.toml installs ater-train and ater-eval pointing at the entry points tested here."""
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["ater-train"] == "ater_ext.cli.train:entry_point"
    assert scripts["ater-eval"] == "ater_ext.cli.evaluate:entry_point"
    assert callable(train.entry_point) and callable(evaluate.entry_point)
