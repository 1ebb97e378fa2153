"""``ater-eval`` as a reviewer needs it (issue 12, items 1-3, 5, 6 and the bad
input): PGD restarts and random starts recorded, AutoAttack and the masking
report from the command line, any model through a factory, figures that name
what they show."""
from __future__ import annotations

import json

import pytest
import torch

from _cli_common import DIGITS, assert_argparse_error, assert_one_line_error, eval_cli, read_csv, train_cli
from ater_ext.cli import plots

FACTORY_KWARGS = json.dumps({"name": "lenet", "input_shape": [1, 8, 8], "num_classes": 10})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An ERM LeNet trained to ~80 % on digits (two seeds) and one AT LeNet."""
    root = tmp_path_factory.mktemp("eval_runs")
    paths = {}
    class _Quiet:  # train_cli wants a capsys-like object; a module fixture has no capsys
        def readouterr(self):
            return "", ""

    for name, argv in (("erm0", ["--method", "erm", "--seed", "0"]), ("erm1", ["--method", "erm", "--seed", "1"]),
                       ("at0", ["--method", "at", "--eps-adv", "0.5"])):
        rc, _, err = train_cli([*argv, *DIGITS, "--model", "lenet", "--epochs", "2", "--lr", "0.01",
                                "--batch-size", "32", "--out", root / name], _Quiet())
        assert rc == 0, err
        paths[name] = root / name / "best.pt"
    return paths


def _eval(args, out, capsys):
    rc, stdout, err = eval_cli([*args, "--device", "cpu", "--out", out], capsys)
    assert rc == 0, err
    return json.loads((out / "robustness.json").read_text())["results"], stdout


def test_pgd_settings_recorded_in_the_outputs(checkpoints, tmp_path, capsys):
    base = ["--checkpoint", checkpoints["erm0"], "--attacks", "pgd-l2", "--eps-list", "0,0.5", "--limit", "100",
            "--steps", "5"]
    (one,), _ = _eval(base, tmp_path / "one", capsys)
    (many,), _ = _eval([*base, "--restarts", "3", "--step-size", "0.2"], tmp_path / "many", capsys)
    assert one["pgd"] == {"steps": 5, "step_size": "2.5 * eps / steps", "random_start": False, "restarts": 1,
                          "seed": 0}
    assert many["pgd"]["restarts"] == 3 and many["pgd"]["random_start"] and many["pgd"]["step_size"] == 0.2
    columns, rows = read_csv(tmp_path / "many" / "robustness.csv")
    assert {"steps", "restarts", "norm", "n"} <= set(columns)
    assert {(r["attack"], r["steps"], r["restarts"], r["norm"]) for r in rows} == {("pgd-l2", "5", "3", "l2")}
    assert one["selected_on"].startswith("validation (200 images")


def test_autoattack_and_masking_report(checkpoints, tmp_path, capsys):
    out = tmp_path / "aa"
    results, stdout = _eval(["--checkpoint", checkpoints["at0"], "--attacks", "fgsm", "--linf-eps-list", "0,0.3",
                             "--limit", "60", "--autoattack", "--aa-eps", "0.3", "--aa-limit", "20",
                             "--masking-report", "--surrogate", checkpoints["erm0"]], out, capsys)
    (r,) = results
    aa = r["autoattack"]
    assert aa["version"] == "standard" and aa["n"] == 20 and aa["norm"] == "linf" and aa["eps"] == 0.3
    assert [a["attack"] for a in aa["per_attack"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa["robust_accuracy"] <= aa["clean_accuracy"] and aa["seconds"] > 0
    assert "AutoAttack linf eps=0.3" in stdout and "masking report:" in stdout
    _, rows = read_csv(out / "robustness.csv")
    (aa_row,) = [row for row in rows if row["attack"].startswith("autoattack")]
    assert float(aa_row["accuracy"]) == pytest.approx(aa["robust_accuracy"])
    masking = json.loads((out / "masking.json").read_text())
    (report,) = masking.values()
    names = {c["name"] for c in report["checks"]}
    assert names == {"more_steps", "single_step", "large_radius", "black_box", "transfer", "autoattack_warnings"}
    assert r["masking"]["verdict"] == report["verdict"]
    md = (out / "masking.md").read_text()
    assert report["verdict"] in md and "| transfer |" in md


def test_factory_model_equals_its_checkpoint(checkpoints, tmp_path, capsys):
    args = ["--attacks", "fgsm", "--linf-eps-list", "0,0.1", "--limit", "80"]
    (ckpt,), _ = _eval(["--checkpoint", checkpoints["erm0"], *args], tmp_path / "ckpt", capsys)
    (fac,), _ = _eval(["--model-factory", "ater_ext.models:build_model", "--factory-kwargs", FACTORY_KWARGS,
                       "--weights", checkpoints["erm0"], "--dataset", "digits", "--label", "my-lenet", *args],
                      tmp_path / "fac", capsys)
    assert fac["label"] == "my-lenet" and fac["factory"] == "ater_ext.models:build_model"
    assert fac["clean_accuracy"] == ckpt["clean_accuracy"]
    assert fac["attacks"] == ckpt["attacks"]


def test_factory_model_with_a_dict_output(checkpoints, tmp_path, capsys):
    """A model returning {"logits": ...}: refused without --output (naming it), equal to the checkpoint with it."""
    state = torch.load(checkpoints["erm0"], weights_only=True)["model"]
    weights = tmp_path / "dict.pt"
    torch.save({f"net.{k}": v for k, v in state.items()}, weights)
    argv = ["--model-factory", "_factories:dict_lenet", "--weights", weights, "--dataset", "digits",
            "--attacks", "pgd-linf", "--linf-eps-list", "0,0.1", "--limit", "60"]
    rc, _, err = eval_cli([*argv, "--device", "cpu", "--out", tmp_path / "no"], capsys)
    assert_one_line_error("ater-eval", rc, err, "output=")
    (fac,), _ = _eval([*argv, "--output", "logits"], tmp_path / "yes", capsys)
    (ckpt,), _ = _eval(["--checkpoint", checkpoints["erm0"], "--attacks", "pgd-linf", "--linf-eps-list", "0,0.1",
                        "--limit", "60"], tmp_path / "ckpt", capsys)
    assert fac["attacks"] == ckpt["attacks"] and fac["output"] == "logits"


@pytest.mark.parametrize("argv, needles", [
    (["--model-factory", "ater_ext.models:build_model", "--factory-kwargs", FACTORY_KWARGS], ("--dataset",)),
    (["--model-factory", "ater_ext.models", "--dataset", "digits"], ("package.module:function",)),
    (["--model-factory", "no_such_pkg:f", "--dataset", "digits"], ("cannot import no_such_pkg",)),
    (["--model-factory", "ater_ext.models:nope", "--dataset", "digits"], ("no attribute nope",)),
    (["--model-factory", "ater_ext.models:build_model", "--dataset", "digits", "--factory-kwargs",
      json.dumps({"name": "lenet", "input_shape": [1, 8, 8], "num_classes": 5})], ("5 logits", "10 classes")),
    (["--model-factory", "ater_ext.models:build_model", "--dataset", "digits", "--factory-kwargs", "{oops"],
     ("--factory-kwargs is not JSON",)),
    (["--weights", "w.pt"], ("--weights belongs to --model-factory",)),
    ([], ("--checkpoint", "--model-factory")),
])
def test_bad_model_sources(argv, needles, tmp_path, capsys):
    rc, _, err = eval_cli([*argv, "--device", "cpu", "--out", tmp_path / "e"], capsys)
    assert_one_line_error("ater-eval", rc, err, *needles)


@pytest.mark.parametrize("argv, needles", [
    (["--data-range", "0,0.5"], ("outside the data range [0, 0.5]",)),
    (["--data-range", "0,2", "--autoattack"], ("[0, 1] pixel space",)),
    (["--data-range", "1,0"], ("LO < HI",)),
    (["--surrogate", "x.pt"], ("--masking-report",)),
])
def test_bad_eval_settings(argv, needles, checkpoints, tmp_path, capsys):
    rc, _, err = eval_cli(["--checkpoint", checkpoints["erm0"], "--limit", "10", *argv, "--device", "cpu",
                           "--out", tmp_path / "e"], capsys)
    assert_one_line_error("ater-eval", rc, err, *needles)


@pytest.mark.parametrize("argv, needle", [
    (["--aa-norm", "l1"], "--aa-norm"),
    (["--aa-eps", "0"], "--aa-eps"),
    (["--aa-eps", "nan"], "--aa-eps"),
    (["--restarts", "0"], "--restarts"),
])
def test_bad_eval_values_rejected_by_argparse(argv, needle, tmp_path, capsys):
    rc, _, err = eval_cli(["--checkpoint", tmp_path / "x.pt", *argv, "--out", tmp_path], capsys)
    assert_argparse_error("ater-eval", rc, err, needle)


def test_figure_groups_seeds_into_a_band(checkpoints, tmp_path, capsys, monkeypatch):
    bands, labels, titles = [], [], []
    real_fill = plots.plt.Axes.fill_between

    def fill(self, *a, **k):
        bands.append(a)
        return real_fill(self, *a, **k)

    monkeypatch.setattr(plots.plt.Axes, "fill_between", fill)
    real_savefig = plots.save_figure

    def capture(fig, path, **k):
        for ax in fig.axes:
            titles.append(ax.get_title())
        labels.extend(t.get_text() for legend in fig.legends for t in legend.get_texts())
        real_savefig(fig, path, **k)

    monkeypatch.setattr(plots, "save_figure", capture)
    _eval(["--checkpoint", checkpoints["erm0"], checkpoints["erm1"], checkpoints["at0"], "--attacks", "pgd-linf",
           "--linf-eps-list", "0,0.1", "--limit", "40", "--steps", "3"], tmp_path / "fig", capsys)
    assert len(bands) == 1, "the two ERM seeds make one mean +- std band, the single AT run none"
    assert labels == ["ERM (2 runs, mean +- std)", "AT (at0/best.pt)"]
    assert titles == ["PGD-3 (L-inf)\ndigits, n = 40 test points"]
