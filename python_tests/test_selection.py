"""Checkpoint selection on a validation split held out of the training set
(issue 12, item 4; SPEC section 5): balanced, fixed by the seed, never trained
on, and the test set never chooses ``best.pt``."""
from __future__ import annotations

import pytest
import torch

from _cli_common import DIGITS, assert_one_line_error, eval_cli, load_ckpt, read_metrics, train_cli
from ater_ext import robustness
from ater_ext.cli import selection, train
from ater_ext.data import balanced_label_split, load_dataset
from ater_ext.models import build_model

BASE = ["--method", "erm", *DIGITS, "--model", "lenet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_split_is_balanced_disjoint_and_fixed_by_the_seed():
    data = load_dataset("digits")
    train_idx, val_idx = selection.split_validation(data, 200, seed=3)
    assert torch.bincount(data.y_train[val_idx], minlength=10).tolist() == [20] * 10
    assert len(set(train_idx.tolist()) & set(val_idx.tolist())) == 0
    assert len(train_idx) + len(val_idx) == len(data.y_train)
    again = selection.split_validation(data, 200, seed=3)[1]
    other = selection.split_validation(data, 200, seed=4)[1]
    assert torch.equal(val_idx, again) and not torch.equal(val_idx, other)


def test_training_never_sees_the_validation_images(tmp_path, capsys, monkeypatch):
    seen = []
    original = train.Streams.epoch

    def recording(self, epoch):
        for idx_l, idx_ul in original(self, epoch):
            seen.append(idx_l)
            yield idx_l, idx_ul

    monkeypatch.setattr(train.Streams, "epoch", recording)
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--seed", "2", "--out", tmp_path / "run"], capsys)
    assert rc == 0, err
    data = load_dataset("digits")
    val_idx, _ = balanced_label_split(data.y_train, 200, 10, 2)  # the documented rule, recomputed
    trained_on = set(torch.cat(seen).tolist())
    assert trained_on.isdisjoint(val_idx.tolist())
    assert len(trained_on) == len(data.y_train) - 200


def test_logged_validation_figures_match_an_independent_computation(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--eps-adv", "0.5", "--select-subset", "50", "--out", out],
                           capsys)
    assert rc == 0, err
    (row,) = read_metrics(out)["epochs"]
    data = load_dataset("digits")
    val_idx, _ = balanced_label_split(data.y_train, 200, 10, 0)
    model = build_model("lenet", data.input_shape, 10)
    model.load_state_dict(load_ckpt(out / "best.pt")["model"])
    model.eval()
    x, y = data.x_train[val_idx], data.y_train[val_idx]
    with torch.no_grad():
        errors = int((model(x).argmax(1) != y).sum())
    assert row["val_error"] == pytest.approx(100.0 * errors / 200)
    sub = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:50]  # spread_subset's rule
    expected = robustness.attack_accuracy(model, x[sub], y[sub], "pgd-l2", 0.5, steps=10)
    assert row["val_robust_acc"] == pytest.approx(expected)


@pytest.mark.parametrize("select, val_errors, val_robust, best", [
    ("clean", [5.0, 3.0, 4.0], [10.0, 20.0, 30.0], 2),
    ("robust", [5.0, 3.0, 4.0], [10.0, 20.0, 30.0], 3),
    ("robust", [5.0, 3.0, 4.0], [30.0, 30.0, 10.0], 2),   # tie on the robust accuracy: the lower val_error
])
def test_best_follows_validation_not_test(select, val_errors, val_robust, best, tmp_path, capsys, monkeypatch):
    """Controlled figures: the test error favours epoch 1, validation another epoch; best.pt follows validation."""
    epochs = iter(range(3))

    def measure(self, model):
        i = next(epochs)
        return {"val_error": val_errors[i], "val_robust_acc": val_robust[i]}

    test_errors = iter([1.0, 50.0, 60.0])
    monkeypatch.setattr(selection.Validation, "measure", measure)
    monkeypatch.setattr(train, "test_error", lambda *a, **k: {"test_error": next(test_errors), "test_loss": 0.0})
    out = tmp_path / "run"
    rc, _, err = train_cli([*BASE, "--epochs", "3", "--select", select, "--out", out], capsys)
    assert rc == 0, err
    state = load_ckpt(out / "best.pt")
    assert state["epoch"] == best and load_ckpt(out / "last.pt")["best_epoch"] == best


def test_no_validation_keeps_the_last_epoch(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = train_cli([*BASE, "--epochs", "2", "--val-size", "0", "--out", out], capsys)
    assert rc == 0, err
    assert load_ckpt(out / "best.pt")["epoch"] == 2
    assert "val_error" not in read_metrics(out)["epochs"][0]


@pytest.mark.parametrize("argv, needles", [
    (["--val-size", "0", "--select", "robust"], ("--select robust", "validation")),
    (["--val-size", "205"], ("--val-size 205", "divisible")),
    (["--val-size", "5000"], ("--val-size", "1433")),
    (["--val-size", "1400"], ("--val-size 1400", "only 139")),
    (["--val-size", "1300", "--labels", "200", "--method", "vat"], ("--labels 200", "--val-size 1300")),
])
def test_bad_validation_settings(argv, needles, tmp_path, capsys):
    rc, _, err = train_cli([*BASE, "--epochs", "1", *argv, "--out", tmp_path / "run"], capsys)
    assert_one_line_error("ater-train", rc, err, *needles)


def test_old_checkpoint_without_split_still_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = train_cli([*BASE, "--epochs", "1", "--out", out], capsys)
    assert rc == 0, err
    state = load_ckpt(out / "best.pt")
    for key in ("val_size", "select", "select_subset", "on_nonfinite"):
        state["config"].pop(key)
    state.pop("best_epoch")
    for row in state["history"]:
        row.pop("val_error"), row.pop("val_robust_acc")
    torch.save(state, out / "old.pt")
    rc, _, err = eval_cli(["--checkpoint", out / "old.pt", "--attacks", "fgsm", "--linf-eps-list", "0,0.1",
                           "--limit", "20", "--device", "cpu", "--out", tmp_path / "eval"], capsys)
    assert rc == 0, err
