"""Long runs as users run them: --epochs raised on --resume extends a run (and
what that does to the lr schedule), a finished run says so, resuming names its
epoch, --updates-per-epoch streams, augmentation replayed on resume, --quiet,
curves.png and --tensorboard (digits, LeNet, two updates an epoch)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _cli_common import (DIGITS, assert_nested_equal, assert_one_line_error, assert_state_dicts_equal, load_ckpt,
                         read_metrics, train_cli)
from ater_ext.cli import train
from ater_ext.data import load_dataset

BASE = ["--method", "erm", *DIGITS, "--model", "lenet", "--updates-per-epoch", "2", "--val-size", "20",
        "--select-subset", "10"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny runs are faster on one thread


def test_extend_a_finished_run(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="ater_ext")
    out = tmp_path / "run"
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--out", out], capsys)
    assert rc == 0, err
    before = (out / "last.pt").read_bytes()
    caplog.clear()
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--resume", "--out", out], capsys)  # nothing left to train
    assert rc == 0, err
    assert "the run is finished (epoch 1 of 1)" in caplog.text and "raise --epochs" in caplog.text
    assert (out / "last.pt").read_bytes() == before
    caplog.clear()
    rc, _, err = train_cli([*BASE, "--epochs", "2", "--resume", "--out", out], capsys)
    assert rc == 0, err
    assert "extending" in caplog.text and "warm restart" in caplog.text
    assert "resuming" in caplog.text and "from epoch 2 of 2" in caplog.text
    m = read_metrics(out)
    assert [r["epoch"] for r in m["epochs"]] == [1, 2] and m["finished"]
    assert m["extensions"] == [{"at_epoch": 1, "from_epochs": 1, "to_epochs": 2}]
    assert load_ckpt(out / "last.pt")["extensions"] == m["extensions"]
    # the schedule of a 2-epoch run of 2 updates: decay from update 2 of 4, so the last update (3) runs at lr / 2,
    # where the 1-epoch run had ended at update 1 of 2 with lr 0.001 * (2 - 1) / 1
    assert m["epochs"][0]["lr"] == pytest.approx(1e-3)
    assert m["epochs"][1]["lr"] == pytest.approx(1e-3 * (4 - 3) / (4 - 2))
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--resume", "--out", out], capsys)
    assert_one_line_error("ater-train", rc, err, "--resume", "shorten", "2 epochs")


def test_resume_with_updates_per_epoch_and_augmentation_is_bit_identical(tmp_path, capsys):
    plain = [*BASE, "--method", "vat", "--labels", "100", "--batch-size", "16", "--ul-batch-size", "64",
             "--epochs", "2"]
    base = [*plain, "--augment", "translate,flip"]
    straight, split = tmp_path / "a", tmp_path / "b"
    rc, _, err = train_cli([*base, "--out", straight], capsys)
    assert rc == 0, err
    rc, _, err = train_cli([*base, "--stop-after", "1", "--out", split], capsys)
    assert rc == 0, err
    torch.manual_seed(99)
    rc, _, err = train_cli([*base, "--resume", "--out", split], capsys)
    assert rc == 0, err
    a, b = load_ckpt(straight / "last.pt"), load_ckpt(split / "last.pt")
    assert_state_dicts_equal(a["model"], b["model"])
    assert_nested_equal(a["optimizer"], b["optimizer"], "optimizer")
    # augmentation changes the run: without it the weights differ
    rc, _, err = train_cli([*plain, "--out", tmp_path / "c"], capsys)
    assert rc == 0, err
    c = load_ckpt(tmp_path / "c" / "last.pt")
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"] if a["model"][k].is_floating_point())


def test_updates_per_epoch_reads_endless_streams():
    args, recipe = train.parse_args([*BASE, "--method", "vat", "--labels", "100", "--batch-size", "30",
                                     "--ul-batch-size", "70", "--updates-per-epoch", "3", "--out", "x"])
    cfg = train.config_from_args(args, recipe)
    data = load_dataset("digits")
    pool = torch.arange(len(data.y_train))
    streams = train.Streams(data, pool, cfg)
    assert streams.steps_per_epoch() == 3
    lab = torch.cat([l for e in (1, 2, 3, 4) for l, _ in streams.epoch(e)])  # 12 updates of 30: 360 labelled draws
    ul = torch.cat([u for e in (1, 2) for _, u in streams.epoch(e)])  # 6 updates of 70: 420 of the 1333 unlabelled
    n_l = len(streams.labelled)
    # each consecutive block of n_l labelled draws is one pass: every labelled index exactly once
    for k in range(len(lab) // n_l):
        assert sorted(lab[k * n_l:(k + 1) * n_l].tolist()) == streams.labelled.tolist()
    assert len(set(ul.tolist())) == len(ul) and set(ul.tolist()) <= set(streams.unlabelled.tolist())
    again = train.Streams(data, pool, cfg)  # a resumed run reads the same batches for epoch 3
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(streams.epoch(3), again.epoch(3)))


def test_quiet_curves_and_tensorboard(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="ater_ext")
    out, tb = tmp_path / "run", tmp_path / "tb"
    rc, _, err = train_cli([*BASE, "--epochs", "2", "--quiet", "--tensorboard", tb, "--out", out], capsys)
    assert rc == 0, err
    assert "epoch 1/2" not in caplog.text and "finished, 2 epochs" in caplog.text
    import matplotlib.image as mpimg

    image = mpimg.imread(out / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    rows = read_metrics(out)["epochs"]
    for key in ("test_error", "train_loss", "val_error"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    caplog.clear()
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--out", tmp_path / "loud"], capsys)
    assert rc == 0, err
    assert "epoch 1/1" in caplog.text
