"""ater-train --method pgd-at | trades | fgsm-rs: trained like the others, recorded
in metrics and checkpoints, evaluated by ater-eval alike, bad options refused."""
from __future__ import annotations

import pytest
import torch

from ater_ext import objectives
from ater_ext.cli import train
from ater_ext.cli.common import load_checkpoint

from _cli_common import DIGITS, assert_argparse_error, assert_one_line_error, eval_cli, read_metrics, train_cli

TINY = [*DIGITS, "--epochs", "1", "--val-size", "100", "--select-subset", "20"]


DIGITS_L2 = train.default_eps_adv("digits", "l2")  # the dataset-aware L2 radius


@pytest.mark.parametrize("method, extra, stat, norm, eps", [
    ("pgd-at", ["--steps", "2"], "train_adv", "l2", DIGITS_L2),
    ("pgd-at", ["--norm", "linf", "--steps", "2"], "train_adv", "linf", 0.3),
    ("trades", ["--steps", "2", "--beta", "3"], "train_kl", "l2", DIGITS_L2),
    ("fgsm-rs", [], "train_adv", "linf", 0.3),
])
def test_baseline_trains_and_records_its_settings(tmp_path, capsys, method, extra, stat, norm, eps):
    out = tmp_path / method
    rc, _, err = train_cli(["--method", method, *TINY, *extra, "--out", out], capsys)
    assert rc == 0, err
    rows = read_metrics(out)["epochs"]
    assert stat in rows[0] and torch.isfinite(torch.tensor(rows[0]["train_loss"]))
    config = load_checkpoint(str(out / "best.pt"))["config"]
    assert (config["method"], config["norm"], config["eps_adv"]) == (method, norm, pytest.approx(eps))
    # ater-eval treats it as any other checkpoint: AutoAttack's default radius is its training one
    rc, _, err = eval_cli(["--checkpoint", out / "best.pt", "--out", tmp_path / "eval", "--device", "cpu",
                           "--limit", "20", "--attacks", "fgsm", "--eps-list", "0", "--linf-eps-list", "0"], capsys)
    assert rc == 0, err


def test_objective_dispatch_is_the_library_loss():
    """The CLI's pgd-at loss is objectives.pgd_at_loss with the configured options (same random start)."""
    args = train.build_parser().parse_args(["--method", "pgd-at", "--norm", "linf", "--steps", "3",
                                            "--eps-adv", "0.2", *DIGITS])
    cfg = train.config_from_args(args)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    torch.manual_seed(1)
    got, _ = train.objective(cfg, model, x, y, None, None)
    torch.manual_seed(1)
    want, _ = objectives.pgd_at_loss(model, x, y, eps=0.2, norm="linf", steps=3)
    assert torch.equal(got, want)


def test_defaults_per_norm():
    parse = train.build_parser().parse_args
    assert train.config_from_args(parse(["--method", "pgd-at", *DIGITS])).eps_adv == DIGITS_L2
    assert train.config_from_args(parse(["--method", "pgd-at", "--dataset", "mnist-5k"])).eps_adv == 2.0
    assert train.config_from_args(parse(["--method", "fgsm-rs", *DIGITS])).eps_adv == 0.3
    cfg = train.config_from_args(parse(["--method", "trades", "--norm", "linf", "--dataset", "cifar10"]))
    assert cfg.eps_adv == pytest.approx(8 / 255) and (cfg.steps, cfg.beta) == (10, 6.0)


@pytest.mark.parametrize("argv, needles", [
    (["--method", "pgd-at", "--steps", "0"], ["--steps", "0"]),
    (["--method", "trades", "--beta", "0"], ["--beta", "0"]),
    (["--method", "trades", "--beta", "nan"], ["--beta", "nan"]),
    (["--method", "fgsm-rs", "--norm", "l2"], ["--norm l2", "fgsm-rs"]),
    (["--method", "ater", "--steps", "3"], ["--steps", "ater"]),
    (["--method", "pgd-at", "--beta", "3"], ["--beta", "pgd-at"]),
    (["--method", "erm", "--norm", "linf"], ["--norm", "erm"]),
    (["--method", "at", "--xmax-steps", "2"], ["--xmax-steps", "at"]),
    (["--method", "ater", "--xmax-steps", "0"], ["--xmax-steps", "0"]),
])
def test_bad_baseline_options_are_one_line_errors(tmp_path, capsys, argv, needles):
    rc, _, err = train_cli([*argv, *TINY, "--out", tmp_path / "run"], capsys)
    assert_one_line_error("ater-train", rc, err, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--method", "pgd-at", "--norm", "l1"], "--norm"),
    (["--method", "pgd-at", "--eps-adv", "inf"], "--eps-adv"),
    (["--method", "pgd-at", "--eps-adv", "-1"], "--eps-adv"),
])
def test_bad_norm_or_radius_rejected_by_the_parser(tmp_path, capsys, argv, needle):
    rc, _, err = train_cli([*argv, *TINY, "--out", tmp_path / "run"], capsys)
    assert_argparse_error("ater-train", rc, err, needle)


def test_checkpoint_without_the_new_fields_still_resumes(tmp_path, capsys):
    """A run written before --norm / --steps / --beta existed resumes with their defaults."""
    out = tmp_path / "old"
    rc, _, err = train_cli(["--method", "erm", *DIGITS, "--epochs", "2", "--val-size", "100", "--stop-after", "1",
                            "--out", out], capsys)
    assert rc == 0, err
    state = torch.load(out / "last.pt", weights_only=False)
    for key in ("norm", "steps", "beta"):
        del state["config"][key]
    torch.save(state, out / "last.pt")
    rc, _, err = train_cli(["--method", "erm", *DIGITS, "--epochs", "2", "--val-size", "100", "--resume",
                            "--out", out], capsys)
    assert rc == 0, err
    assert [r["epoch"] for r in read_metrics(out)["epochs"]] == [1, 2]


@pytest.mark.parametrize("train_norm, aa_norm, want", [("linf", "linf", 0.3), ("l2", "linf", 0.1), ("linf", "l2", None),
                                                       ("l2", "l2", 0.3)])
def test_autoattack_radius_is_the_training_one_in_the_same_norm(train_norm, aa_norm, want):
    from ater_ext.cli import evaluate
    from ater_ext.cli.common import CliError
    from ater_ext.cli.targets import Target
    args = evaluate.build_parser().parse_args(["--checkpoint", "x.pt", "--aa-norm", aa_norm])
    target = Target(label="x.pt", model=None, data=None, info={"train_eps_adv": 0.3, "train_norm": train_norm})
    if want is None:
        with pytest.raises(CliError, match="--aa-eps"):
            evaluate.aa_radius(args, target)
    else:
        assert evaluate.aa_radius(args, target) == pytest.approx(want)


def test_ater_maximiser_options_reach_the_objective(tmp_path, capsys):
    """--xmax-direction / --xmax-steps: ater_loss's direction= and steps=, recorded in the checkpoint."""
    args = train.build_parser().parse_args(["--method", "ater", "--xmax-direction", "hvp", "--xmax-steps", "2",
                                            *DIGITS])
    cfg = train.config_from_args(args)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    got, stats = train.objective(cfg, model, x, y, None, None)
    want, _ = objectives.ater_loss(model, x, y, eps_adv=cfg.eps_adv, eps=cfg.eps, lam=cfg.lam, direction="hvp",
                                   steps=2)
    plain, _ = objectives.ater_loss(model, x, y, eps_adv=cfg.eps_adv, eps=cfg.eps, lam=cfg.lam)
    assert torch.equal(got, want) and not torch.equal(got, plain)
    out = tmp_path / "hvp"
    rc, _, err = train_cli(["--method", "ater", "--xmax-direction", "hvp", "--xmax-steps", "2", *TINY, "--out", out],
                           capsys)
    assert rc == 0, err
    config = load_checkpoint(str(out / "best.pt"))["config"]
    assert (config["xmax_direction"], config["xmax_steps"]) == ("hvp", 2)
    assert "train_xmax_grad_ratio" in read_metrics(out)["epochs"][0]
