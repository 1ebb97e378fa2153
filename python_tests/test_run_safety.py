"""Never lose a run (issue 13, items 1-4 and the command-line parts of 8): atomic
writes survive a kill between write and rename, a 0-byte checkpoint is a clean
error, a non-finite run stops without touching a good ``best.pt``, one ``--out``
serves one run at a time, and failed commands leave no empty folders.

Runs on digits with LeNet for one or two epochs (a few seconds each)."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from _cli_common import DIGITS, assert_one_line_error, eval_cli, load_ckpt, read_metrics, train_cli
from ater_ext import atomic_io
from ater_ext.cli import run_dir as run_dir_module
from ater_ext.cli import train
from ater_ext.data import DataError, load_dataset

REPO = Path(__file__).resolve().parents[1]
BASE = ["--method", "erm", *DIGITS, "--model", "lenet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# ------------------------------------------------------------ atomic writes
def test_kill_between_write_and_replace_keeps_the_previous_file(tmp_path):
    """A process SIGKILLed after writing the new bytes but before the rename leaves the old file whole."""
    target = tmp_path / "last.pt"
    atomic_io.save_torch(str(target), {"epoch": 1, "w": torch.arange(1000.0)})
    before = target.read_bytes()
    proc = _python("""
        import os, signal, sys, torch
        from ater_ext import atomic_io
        def die(*args):
            os.kill(os.getpid(), signal.SIGKILL)   # the moment after write + fsync, before os.replace
        atomic_io.os.replace = die
        atomic_io.save_torch(sys.argv[1], {"epoch": 2, "w": torch.zeros(1000)})
    """, str(target))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=True)["epoch"] == 1
    strays = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert all(name.startswith(".last.pt.") and name.endswith(".tmp") for name in strays), strays


def test_failed_writer_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_io.write_json(str(target), {"ok": 1})
    with pytest.raises(TypeError):
        atomic_io.write_json(str(target), {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    with pytest.raises(KeyboardInterrupt):
        with atomic_io.atomic_write(str(target), "w") as f:
            f.write('{"half":')
            raise KeyboardInterrupt  # Ctrl-C mid-write
    assert json.loads(target.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_symlink_at_destination_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "last.pt"
    link.symlink_to(victim)
    atomic_io.save_torch(str(link), {"epoch": 1})
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and torch.load(link, weights_only=True) == {"epoch": 1}


def test_interrupted_checkpoint_save_keeps_last_and_best_loadable(tmp_path, capsys, monkeypatch):
    """ater-train's checkpoint writes are the atomic ones: a Ctrl-C inside the epoch-2 save leaves epoch 1's
    last.pt / best.pt intact, and --resume then finishes the run."""
    out = tmp_path / "run"
    argv = [*BASE, "--epochs", "2", "--out", out]
    rc, _, err = train_cli([*argv, "--stop-after", "1"], capsys)
    assert rc == 0, err
    last, best = (out / "last.pt").read_bytes(), (out / "best.pt").read_bytes()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_cli([*argv, "--resume"], capsys)
    monkeypatch.undo()
    assert (out / "last.pt").read_bytes() == last and (out / "best.pt").read_bytes() == best
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    rc, _, err = train_cli([*argv, "--resume"], capsys)
    assert rc == 0, err
    assert load_ckpt(out / "last.pt")["epoch"] == 2


# ------------------------------------------------------- bad checkpoints
def test_zero_byte_checkpoint_is_a_one_line_error(tmp_path, capsys):
    empty = tmp_path / "last.pt"
    empty.write_bytes(b"")
    rc, _, err = eval_cli(["--checkpoint", empty, "--device", "cpu", "--out", tmp_path / "eval"], capsys)
    assert_one_line_error("ater-eval", rc, err, str(empty), "empty")


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.update(epoch=-5), "epoch"),
    (lambda s: s.update(epoch=99), "history"),
    (lambda s: s.update(history="x"), "history"),
    (lambda s: s.update(best_error="low"), "best_error"),
])
def test_hand_edited_checkpoint_is_refused(edit, needle, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*BASE, "--epochs", "2", "--out", out]
    rc, _, err = train_cli([*argv, "--stop-after", "1"], capsys)
    assert rc == 0, err
    state = load_ckpt(out / "last.pt")
    edit(state)
    torch.save(state, out / "last.pt")
    rc, _, err = train_cli([*argv, "--resume"], capsys)
    assert_one_line_error("ater-train", rc, err, needle)


# -------------------------------------------------------- non-finite guard
def _nan_every(every: int):
    """Wraps ater-train's objective so that every ``every``-th step's loss is NaN."""
    original = train.objective
    calls = {"n": 0}

    def objective(cfg, model, x, y, x_ul, scaler):
        loss, stats = original(cfg, model, x, y, x_ul, scaler)
        calls["n"] += 1
        if calls["n"] % every == 0:
            loss = loss * float("nan")
            stats = {**stats, "loss": float("nan")}
        return loss, stats
    return objective


def test_nan_stops_the_run_and_keeps_the_good_best(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = [*BASE, "--epochs", "3", "--out", out]
    rc, _, err = train_cli([*argv, "--stop-after", "1"], capsys)
    assert rc == 0, err
    best, last = (out / "best.pt").read_bytes(), (out / "last.pt").read_bytes()
    monkeypatch.setattr(train, "objective", _nan_every(1))  # from the resumed epoch 2 on
    rc, _, err = train_cli([*argv, "--resume"], capsys)
    line = assert_one_line_error("ater-train", rc, err, "non-finite loss", "epoch 2 step 1", "--on-nonfinite")
    assert (out / "best.pt").read_bytes() == best and (out / "last.pt").read_bytes() == last, line
    assert [r["epoch"] for r in read_metrics(out)["epochs"]] == [1]


def test_huge_learning_rate_exits_nonzero_without_a_nonfinite_checkpoint(tmp_path):
    """The issue's reproduction, as a real process: --lr 1e30 used to train NaN for every epoch and exit 0."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ater_ext.cli.train", *BASE, "--epochs", "2", "--lr", "1e30",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "non-finite" in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
    for name in ("best.pt", "last.pt"):
        if (out / name).exists():
            state = load_ckpt(out / name)
            assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skip_policy_skips_nonfinite_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "objective", _nan_every(3))
    out = tmp_path / "run"
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--on-nonfinite", "skip", "--out", out], capsys)
    assert rc == 0, err
    (row,) = read_metrics(out)["epochs"]
    steps = -(-(1433 - 200) // 100)  # digits: 1433 training images less 200 for validation, batch 100
    assert row["skipped_steps"] == steps // 3
    assert np.isfinite(row["train_loss"])
    state = load_ckpt(out / "best.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# -------------------------------------------------------- one run per --out
HOLD_LOCK = """
    import sys, time
    from ater_ext.cli.run_dir import RunDir
    with RunDir(sys.argv[1], resume=False, overwrite=False):
        print("locked", flush=True)
        time.sleep(120)
"""


def test_concurrent_run_on_one_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _python(HOLD_LOCK, str(out))
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = train_cli([*BASE, "--epochs", "1", "--out", out], capsys)
        line = assert_one_line_error("ater-train", rc, err, str(out), "in use", f"pid {holder.pid}")
        assert not (out / "last.pt").exists(), line
    finally:
        holder.kill()
        holder.communicate()
    # a killed holder releases the lock (the kernel drops a dead process's flock)
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--out", out], capsys)
    assert rc == 0, err


def test_two_training_processes_one_out(tmp_path):
    """Two real ater-train processes on one --out: exactly one trains, the other is refused."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ater_ext.cli.train", *BASE, "--epochs", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "in use" in refused or "already holds" in refused, refused
    state = load_ckpt(out / "last.pt")
    assert load_ckpt(out / "best.pt")["config"] == state["config"]


def test_nonempty_out_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--out", out], capsys)
    assert rc == 0, err
    first = (out / "last.pt").read_bytes()
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--out", out], capsys)
    assert_one_line_error("ater-train", rc, err, str(out), "--resume", "--overwrite")
    assert (out / "last.pt").read_bytes() == first
    (out / "best.pt").write_bytes(b"stale")  # --overwrite must not let an old best.pt survive
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--seed", "3", "--overwrite", "--out", out], capsys)
    assert rc == 0, err
    assert load_ckpt(out / "best.pt")["config"]["seed"] == 3
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--resume", "--overwrite", "--out", out], capsys)
    assert_one_line_error("ater-train", rc, err, "--resume", "--overwrite")


# ------------------------------------------------ no empty folders behind
def test_failed_commands_leave_no_folder(tmp_path, capsys):
    missing = tmp_path / "a" / "b"
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--resume", "--out", missing], capsys)
    assert_one_line_error("ater-train", rc, err, "last.pt")
    assert not (tmp_path / "a").exists()
    rc, _, err = train_cli(["--method", "erm", "--dataset", "mnist", "--device", "cpu", "--out", missing], capsys)
    assert_one_line_error("ater-train", rc, err, "--data-dir")
    assert not (tmp_path / "a").exists()


def test_unwritable_out_is_found_before_training(tmp_path, capsys, monkeypatch):
    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def never(*args, **kwargs):
        raise AssertionError("training started although --out is not writable")

    monkeypatch.setattr(run_dir_module.tempfile, "TemporaryFile", unwritable)
    monkeypatch.setattr(train.Trainer, "__init__", never)
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--out", tmp_path / "new"], capsys)
    assert_one_line_error("ater-train", rc, err, "not writable")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("device, needle", [("tpu", "tpu"), ("meta", "meta"), ("cuda:7", "cuda")])
def test_unsupported_device_is_a_one_line_error(device, needle, tmp_path, capsys):
    rc, _, err = train_cli(["--method", "erm", "--dataset", "digits", "--device", device,
                            "--out", tmp_path / "run"], capsys)
    assert_one_line_error("ater-train", rc, err, "--device", needle)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------- CIFAR pickles run no code
class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unverified_cifar_pickle_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [0, 1]}
        if name == "data_batch_3":
            entry["filenames"] = _Payload(str(marker))
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path, verify_checksums=False)
    assert not marker.exists(), "unpickling a CIFAR file ran code"


# ---------------------------------------------------------- progress bars
class _Terminal:
    """A stderr stand-in that says it is a terminal."""

    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


class _Pipe(_Terminal):
    def isatty(self):
        return False


def test_progress_bars_only_on_a_terminal():
    from ater_ext.cli.common import progress

    for stream, quiet, shown in ((_Terminal(), False, True), (_Terminal(), True, False), (_Pipe(), False, False)):
        with progress(range(3), desc="epoch 1/1", file=stream, quiet=quiet) as bar:
            for _ in bar:
                pass
        assert ("epoch 1/1" in stream.text) == shown, (type(stream).__name__, quiet, stream.text)
