"""ater-sweep: recipes x methods x seeds, resumable, mean +- std beside the
paper, --print-commands, and a folder holding another recipe's runs (digits,
LeNet, two updates an epoch: a few seconds a run)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from _cli_common import _call, assert_one_line_error, eval_cli, read_csv, read_metrics, train_cli
from ater_ext.cli import sweep

TINY = """
[recipe]
name = "{name}"
row = "MNIST, supervised, MLP"
methods = ["erm", "ater"]

[train]
dataset = "digits"
model = "lenet"
epochs = 1
updates_per_epoch = 2
val_size = 20
select_subset = 10

[eval]
attack = "pgd-l2"
eps = 0.5
steps = 2
limit = 30
eps_list = [0, 0.5, 1.0]
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny runs are faster on one thread


def sweep_cli(argv, capsys):
    return _call("ater-sweep", sweep.main, argv, capsys)


def recipe(tmp_path: Path, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(name=name))
    return path


def test_sweep_resumes_skips_and_aggregates(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="ater_ext")
    rec, out = recipe(tmp_path), tmp_path / "sweep"
    base = [rec, "--seeds", "0,1", "--out", out, "--device", "cpu", "--quiet"]
    # killed half way: every run stops after epoch 1 of 2
    rc, _, err = sweep_cli([*base, "--", "--epochs", "2", "--stop-after", "1"], capsys)
    assert rc == 0, err
    runs = [out / "tiny" / m / f"seed{s}" for m in ("erm", "ater") for s in (0, 1)]
    assert all(read_metrics(r)["finished"] is False for r in runs)
    rc, printed, _ = sweep_cli([*base, "--print-commands", "--", "--epochs", "2"], capsys)
    lines = printed.strip().splitlines()
    assert rc == 0 and len(lines) == 4 and all(line.startswith("ater-train --config") and "--resume" in line
                                                 for line in lines)
    # the same sweep again resumes every run from epoch 2
    caplog.clear()
    rc, printed, err = sweep_cli([*base, "--", "--epochs", "2"], capsys)
    assert rc == 0, err
    assert caplog.text.count(": resuming") == 4 and caplog.text.count("from epoch 2 of 2") == 4

    # the table against an independent reading of the run files
    _, rows = read_csv(out / "summary.csv")
    assert [(r["method"], r["n"]) for r in rows] == [("erm", "2"), ("ater", "2")]
    for row, method in zip(rows, ("erm", "ater")):
        errors, robust = [], []
        for s in (0, 1):
            m = read_metrics(out / "tiny" / method / f"seed{s}")
            val = [e["val_error"] for e in m["epochs"]]
            best = val.index(min(val))  # the earliest lowest validation error
            assert m["best_epoch"] == best + 1
            errors.append(m["epochs"][best]["test_error"])
            with open(out / "tiny" / method / f"seed{s}" / "robust.json") as f:
                robust.append(json.load(f)["robust_accuracy"])
        assert float(row["test_error_mean"]) == pytest.approx(statistics.fmean(errors))
        assert float(row["test_error_std"]) == pytest.approx(statistics.stdev(errors))
        assert float(row["robust_acc_mean"]) == pytest.approx(statistics.fmean(robust))
        assert float(row["paper"]) == {"erm": 1.11, "ater": 0.57}[method]
        seconds = [e["train_seconds"] for s in (0, 1)
                   for e in read_metrics(out / "tiny" / method / f"seed{s}")["epochs"]]
        assert float(row["train_seconds_per_epoch"]) == pytest.approx(statistics.fmean(seconds))
        cpu = [e["train_cpu_seconds"] for s in (0, 1)
               for e in read_metrics(out / "tiny" / method / f"seed{s}")["epochs"]]
        assert float(row["train_cpu_seconds_per_epoch"]) == pytest.approx(statistics.fmean(cpu))
    md = (out / "summary.md").read_text()
    assert "| tiny | ERM | 2 |" in md and "1.11 +- 0.06" in md and "pgd-l2 eps=0.5, 2 steps" in md
    for png in ("tiny-test-error.png", "tiny-robustness.png"):
        assert (out / png).stat().st_size > 0

    # the robust accuracy is ater-eval's on the same points
    best_pt = out / "tiny" / "ater" / "seed1" / "best.pt"
    rc, _, err = eval_cli(["--checkpoint", best_pt, "--attacks", "pgd-l2", "--eps-list", "0.5", "--steps", "2",
                           "--limit", "30", "--device", "cpu", "--out", tmp_path / "eval"], capsys)
    assert rc == 0, err
    with open(tmp_path / "eval" / "robustness.json") as f:
        want = json.load(f)["results"][0]["attacks"]["pgd-l2"][0]["accuracy"]
    with open(best_pt.parent / "robust.json") as f:
        assert json.load(f)["robust_accuracy"] == want

    # everything finished: a third sweep trains nothing and reuses the evaluations
    stamps = {p: p.stat().st_mtime_ns for r in runs for p in (r / "last.pt", r / "robust.json")}
    caplog.clear()
    rc, _, err = sweep_cli([*base, "--", "--epochs", "2"], capsys)
    assert rc == 0, err
    assert caplog.text.count("finished, skipped") == 4
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    rc, printed, _ = sweep_cli([*base, "--print-commands", "--", "--epochs", "2"], capsys)
    assert rc == 0 and printed.strip() == ""


def test_sweep_folder_with_another_recipe(tmp_path, capsys):
    out = tmp_path / "sweep"
    folder = out / "tiny" / "erm" / "seed0"
    rc, _, err = train_cli(["--config", recipe(tmp_path, "other"), "--method", "erm", "--seed", "0", "--device", "cpu",
                            "--out", folder], capsys)
    assert rc == 0, err
    rc, _, err = sweep_cli([recipe(tmp_path), "--seeds", "0", "--out", out, "--device", "cpu"], capsys)
    assert_one_line_error("ater-sweep", rc, err, str(folder), "recipe other", "not tiny")


def test_sweep_run_with_other_settings(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc, _, err = sweep_cli([recipe(tmp_path), "--methods", "erm", "--seeds", "0", "--out", out, "--device", "cpu",
                            "--no-eval", "--", "--lr", "0.01"], capsys)
    assert rc == 0, err
    rc, _, err = sweep_cli([recipe(tmp_path), "--methods", "erm", "--seeds", "0", "--out", out, "--device", "cpu",
                            "--print-commands"], capsys)
    assert_one_line_error("ater-sweep", rc, err, str(out / "tiny" / "erm" / "seed0"), "lr")
    # --aggregate-only trains nothing: seed 1 is missing from the table, seed 0 is in it
    rc, _, err = sweep_cli([recipe(tmp_path), "--methods", "erm", "--seeds", "0,1", "--out", out, "--device", "cpu",
                            "--aggregate-only", "--no-eval", "--", "--lr", "0.01"], capsys)
    assert rc == 0, err
    assert not (out / "tiny" / "erm" / "seed1").exists()
    _, rows = read_csv(out / "summary.csv")
    assert [(r["method"], r["n"], r["seeds"]) for r in rows] == [("erm", "1", "0")]


@pytest.mark.parametrize("argv, needles", [
    (["--seeds", "0,x"], ("--seeds",)),
    (["--seeds", "1,1"], ("--seeds", "distinct")),
    (["--methods", "sgd"], ("--methods", "sgd")),
    (["--", "--seed", "3"], ("--seed", "itself")),
])
def test_sweep_bad_input(argv, needles, tmp_path, capsys):
    rc, _, err = sweep_cli([recipe(tmp_path), "--out", tmp_path / "s", *argv], capsys)
    assert_one_line_error("ater-sweep", rc, err, *needles)
