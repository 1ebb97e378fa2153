"""Recipes (ater-train --config), the pixel-space preprocessing layer and the
augmentation, and the recipes end to end on synthetic files in torchvision's
CIFAR-10 and SVHN formats (made here; read with --no-verify-checksums, since
load_dataset checks the official MD5 sums by default) and on mnist-5k."""
from __future__ import annotations

import pickle
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from _cli_common import assert_argparse_error, assert_one_line_error, load_ckpt, read_metrics, train_cli
from ater_ext import preprocessing
from ater_ext.cli import recipes, sweep, train
from ater_ext.models import build_model, set_preprocess

README = Path(__file__).resolve().parents[1] / "README.md"
COLUMNS = {"baseline": "erm", "AT (L2)": "at", "VAT": "vat", "ATER": "ater", "VATER": "vater"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny runs are faster on one thread


def paper_table():
    """The paper's table as the README prints it (SPEC section 4): {row: {method: error}}."""
    text = README.read_text()
    head = "| | baseline | AT (L2) | VAT | ATER | VATER |"
    lines = text.split(head, 1)[1].strip().splitlines()[1:]
    table = {}
    for line in lines:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0]] = {COLUMNS[c]: float(v) for c, v in zip(COLUMNS, cells[1:]) if v}
    return table


def resolve(argv):
    args, recipe = train.parse_args([str(a) for a in argv])
    return train.config_from_args(args, recipe)


# ----------------------------------------------------------------- the shipped recipes
def test_every_row_of_the_paper_has_a_recipe_with_its_methods():
    table = paper_table()
    assert len(table) == 4
    parser = train.build_parser()
    shipped = [recipes.load_recipe(n, parser, list(train.METHODS)) for n in recipes.recipe_names()]
    for row, cells in table.items():
        full = [r for r in shipped if r.row == row and r.train.get("dataset") != "mnist-5k"]
        assert len(full) == 1, f"no recipe for the row {row!r}"
        assert full[0].methods == list(cells), row
        # the sweep's paper column holds the same numbers
        assert {m: v[0] for m, v in sweep.PAPER[row].items()} == cells


@pytest.mark.parametrize("name", recipes.recipe_names())
def test_every_recipe_value_cites_its_source(name):
    text = (Path(recipes.RECIPE_DIR) / f"{name}.toml").read_text()
    table = None
    for line in text.splitlines():
        m = re.match(r"^\[(.+)\]", line)
        if m:
            table = m.group(1)
            continue
        if table in ("train", "eval") and re.match(r"^\w+\s*=", line):
            assert "#" in line, f"{name}.toml [{table}]: {line!r} has no source comment"


@pytest.mark.parametrize("name", recipes.recipe_names())
def test_every_method_of_every_recipe_resolves(name):
    parser = train.build_parser()
    recipe = recipes.load_recipe(name, parser, list(train.METHODS))
    for method in recipe.methods:
        cfg = resolve(["--config", name, "--method", method, "--device", "cpu", "--out", "x"])
        assert cfg.recipe == name and cfg.method == method
        for key, value in recipe.defaults(method).items():
            assert getattr(cfg, key) == value, (name, method, key)


def test_flags_win_over_the_recipe():
    cfg = resolve(["--config", "cifar10-4000", "--lr", "0.01", "--epochs", "3", "--decay-start", "1",
                   "--augment", "none", "--device", "cpu"])
    assert (cfg.lr, cfg.epochs, cfg.decay_start, cfg.augment) == (0.01, 3, 1, "")
    assert (cfg.labels, cfg.batch_size, cfg.ul_batch_size, cfg.preprocess, cfg.eps_vat) == (4000, 32, 128, "zca", 2.0)
    assert cfg.method == "vat"  # the recipe's first method when --method is not given


def test_method_tables_override_train(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[recipe]\nname = "r"\nmethods = ["erm", "ater"]\n[train]\ndataset = "digits"\nlam = 0.2\n'
                    'epochs = 3\n[method.ater]\nlam = 0.7\n')
    assert resolve(["--config", path, "--device", "cpu"]).method == "erm"
    assert resolve(["--config", path, "--method", "ater", "--device", "cpu"]).lam == 0.7
    assert resolve(["--config", path, "--method", "erm", "--device", "cpu"]).lam == 0.2
    assert resolve(["--config", path, "--method", "ater", "--lam", "0.4", "--device", "cpu"]).lam == 0.4
    assert resolve(["--config", path, "--device", "cpu"]).epochs == 3


def test_decay_start_beyond_epochs_names_the_recipe(tmp_path, capsys):
    rc, _, err = train_cli(["--config", "cifar10-4000", "--epochs", "100", "--device", "cpu",
                            "--out", tmp_path / "o"], capsys)
    assert_one_line_error("ater-train", rc, err, "--decay-start 460", "cifar10-4000.toml", "--epochs 100")


def test_dataset_aware_defaults_and_provenance_in_help(capsys):
    digits = resolve(["--dataset", "digits", "--method", "vater", "--device", "cpu"])
    assert (digits.eps, digits.eps_adv, digits.eps_vat) == (0.84, 0.84, 0.84)
    svhn = resolve(["--dataset", "svhn", "--method", "vat", "--device", "cpu"])
    assert svhn.eps_vat == 3.5
    mnist = resolve(["--dataset", "mnist-5k", "--device", "cpu"])
    assert (mnist.eps, mnist.eps_adv, mnist.eps_vat) == (2.0, 2.0, 2.0)
    assert train.default_eps_adv("cifar10", "linf") == 8 / 255 and train.default_eps_adv("digits", "linf") == 0.3
    # the digits radius is MNIST's scaled by the ratio of median image norms (independent measurement)
    from ater_ext.data import load_dataset

    ratio = (load_dataset("digits").x_train.flatten(1).norm(dim=1).median()
             / load_dataset("mnist-5k").x_train.flatten(1).norm(dim=1).median())
    assert abs(2.0 * float(ratio) - 0.84) < 0.01
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "digits 0.84" in text and "svhn 3.5" in text and "vat_tf" in text


# ----------------------------------------------------------------- bad recipes
def _write(tmp_path, body: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text('[recipe]\nname = "bad"\nmethods = ["erm"]\n' + body)
    return path


@pytest.mark.parametrize("body, needles", [
    ('[train]\nlearning_rate = 0.1\n', ("train.learning_rate", "unknown key")),
    ('[train]\nlr = "fast"\n', ("train.lr", "number")),
    ('[train]\nlr = -1.0\n', ("train.lr", "> 0")),
    ('[train]\nepochs = 0\n', ("train.epochs", ">= 1")),
    ('[train]\nepochs = 2.5\n', ("train.epochs", "integer")),
    ('[train]\nlabels = true\n', ("train.labels", "integer")),
    ('[train]\ndataset = "imagenet"\n', ("train.dataset", "one of")),
    ('[train]\naugment = ["rotate"]\n', ("train.augment", "rotate")),
    ('[train]\namp = "yes"\n', ("train.amp", "true or false")),
    ('[train]\nzca_eps = -0.1\n', ("train.zca_eps", ">= 0")),
    ('[train]\nout = "x"\n', ("train.out", "command line")),
    ('[method.sgd]\nlr = 0.1\n', ("method.sgd",)),
    ('[method.ater]\nlam = 0\n', ("method.ater.lam",)),
    ('[eval]\nattack = "cw"\n', ("eval.attack",)),
    ('[eval]\neps = -2\n', ("eval.eps",)),
    ('[trian]\nlr = 0.1\n', ("trian",)),
    ('[train\nlr = 0.1\n', ("not valid TOML",)),
])
def test_bad_recipe_is_one_line_error_naming_file_and_key(body, needles, tmp_path, capsys):
    path = _write(tmp_path, body)
    rc, _, err = train_cli(["--config", path, "--device", "cpu", "--out", tmp_path / "out"], capsys)
    assert_one_line_error("ater-train", rc, err, str(path), *needles)
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_name(tmp_path, capsys):
    rc, _, err = train_cli(["--config", "imagenet-1k", "--out", tmp_path / "o"], capsys)
    assert_one_line_error("ater-train", rc, err, "imagenet-1k", "mnist-5k")


@pytest.mark.parametrize("labels, needles", [("5000", ("--labels 5000", "larger")), ("5", ("--labels 5", "smaller"))])
def test_labels_out_of_range(labels, needles, tmp_path, capsys):
    rc, _, err = train_cli(["--method", "vat", "--dataset", "digits", "--model", "lenet", "--device", "cpu",
                            "--labels", labels, "--out", tmp_path / "o"], capsys)
    assert_one_line_error("ater-train", rc, err, *needles)
    assert not (tmp_path / "o").exists()


def test_bad_augment_flag(tmp_path, capsys):
    rc, _, err = train_cli(["--augment", "rotate", "--dataset", "digits", "--out", tmp_path / "o"], capsys)
    assert_argparse_error("ater-train", rc, err, "--augment")


# ----------------------------------------------------------------- ZCA
def _vat_tf_zca(x: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """vat_tf's dataset_utils.ZCA in numpy (an independent twin), with eps inside the square root."""
    mean = x.mean(0)
    m = x - mean
    sigma = m.T @ m / m.shape[0]
    u, s, _ = np.linalg.svd(sigma)
    return (u * (1 / np.sqrt(s + eps) + 1e-6)) @ u.T


def test_zca_matches_vat_tf_formula_and_whitens():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(48, 48, generator=g, dtype=torch.float64)
    x = (torch.rand(600, 48, generator=g, dtype=torch.float64) @ mix).view(600, 3, 4, 4)
    layer = preprocessing.fit_zca(x)
    want = _vat_tf_zca(x.view(600, -1).numpy())
    got = layer.zca_matrix.double().numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    z = layer.double()(x).view(600, -1)
    cov = (z - z.mean(0)).T @ (z - z.mean(0)) / 600
    assert torch.allclose(cov, torch.eye(48, dtype=torch.float64), atol=1e-4)
    radii = preprocessing.whitening_radii(layer, x)
    sv = np.linalg.svd(got, compute_uv=False)
    assert radii["op_norm"] == pytest.approx(sv.max(), rel=1e-6)
    assert radii["inv_op_norm"] == pytest.approx(1 / sv.min(), rel=1e-6)
    assert radii["isotropic"] == pytest.approx(np.linalg.norm(np.linalg.inv(got)) / np.sqrt(48), rel=1e-6)
    # the recipes' mapping: that gain is the data's RMS per-pixel standard deviation
    rms = x.view(600, -1).var(0, unbiased=False).mean().sqrt()
    assert radii["isotropic"] == pytest.approx(float(rms), rel=1e-4)


def test_zca_with_fewer_images_than_pixels_needs_eps():
    x = torch.rand(20, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="singular"):
        preprocessing.fit_zca(x)
    layer = preprocessing.fit_zca(x, eps=0.05)  # the null-space branch against the full eigen formula
    want = _vat_tf_zca(x.view(20, -1).numpy(), eps=0.05)
    assert np.abs(layer.zca_matrix.double().numpy() - want).max() <= 1e-5 * np.abs(want).max()


def test_preprocessing_layer_travels_in_the_state_dict():
    x = torch.rand(100, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    model = set_preprocess(build_model("mlp", (1, 3, 3), 4), preprocessing.fit_zca(x)).eval()
    state = model.state_dict()
    assert {"preprocess.zca_mean", "preprocess.zca_matrix"} <= state.keys()
    fresh = build_model("mlp", (1, 3, 3), 4).eval()  # as ater-eval builds it: no preprocessing yet
    fresh.load_state_dict(state)
    assert isinstance(fresh.preprocess, preprocessing.ZCA)
    assert torch.equal(fresh(x[:5]), model(x[:5]))
    plain = build_model("mlp", (1, 3, 3), 4)
    build_model("mlp", (1, 3, 3), 4).load_state_dict(plain.state_dict())  # old checkpoints: no such keys
    # gradients reach the pixels through the fixed layer; the layer itself has no parameters
    assert not any(n.startswith("preprocess") for n, _ in model.named_parameters())


# ----------------------------------------------------------------- augmentation
def test_augment_translate_and_flip_against_a_loop():
    x = torch.arange(2 * 2 * 6 * 5, dtype=torch.float32).view(2, 2, 6, 5)
    gen = torch.Generator().manual_seed(3)
    out = preprocessing.augment(x, "translate,flip", gen)
    gen = torch.Generator().manual_seed(3)  # the same draws, replayed by hand
    p = preprocessing.TRANSLATE_PX
    shifts = torch.randint(0, 2 * p + 1, (2, 2), generator=gen)
    flips = torch.rand(2, generator=gen) < 0.5
    for i in range(2):
        padded = torch.zeros(2, 6 + 2 * p, 5 + 2 * p)
        padded[:, p:p + 6, p:p + 5] = x[i]
        dy, dx = shifts[i].tolist()
        want = padded[:, dy:dy + 6, dx:dx + 5]
        if flips[i]:
            want = want.flip(-1)
        assert torch.equal(out[i], want)
    assert preprocessing.augment(x, "", gen) is x
    assert preprocessing.parse_augment(["flip", "translate"]) == "translate,flip"
    assert preprocessing.parse_augment("none") == ""


# ----------------------------------------------------------------- end to end on synthetic files
def make_cifar(root: Path, per_batch: int = 10, n_test: int = 4) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        labels = [int(v) % 10 for v in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return root


def make_svhn(root: Path, n_train: int = 40, n_test: int = 4) -> Path:
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)
        sio.savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y})
    return root


TINY = ["--epochs", "1", "--decay-start", "0", "--updates-per-epoch", "1", "--batch-size", "4",
        "--ul-batch-size", "4", "--select-subset", "2", "--device", "cpu", "--no-verify-checksums"]


@pytest.mark.parametrize("recipe, method, extra", [
    ("cifar10", "erm", ["--val-size", "10", "--zca-eps", "0.01"]),
    ("cifar10-4000", "vater", ["--labels", "10", "--zca-eps", "0.01"]),
    ("svhn-1000", "vat", ["--labels", "10"]),
])
def test_recipe_end_to_end_on_synthetic_files(recipe, method, extra, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.Trainer, "ENERGY_SAMPLES", 2)  # the per-epoch energy diagnostic on 2 test images
    data = make_svhn(tmp_path / "svhn") if recipe.startswith("svhn") else make_cifar(tmp_path / "cifar")
    out = tmp_path / "run"
    rc, _, err = train_cli(["--config", recipe, "--method", method, "--data-dir", data, *TINY, *extra,
                            "--out", out], capsys)
    assert rc == 0, err
    metrics = read_metrics(out)
    assert metrics["finished"] and metrics["config"]["recipe"] == recipe
    with open(out / "config.toml", "rb") as f:
        cfg = tomllib.load(f)
    assert cfg["recipe"]["name"] == recipe and cfg["train"]["method"] == method
    assert (out / "curves.png").stat().st_size > 0
    ckpt = load_ckpt(out / "best.pt")
    zca = recipe.startswith("cifar10")
    assert ("preprocess.zca_matrix" in ckpt["model"]) == zca
    if zca:  # the logged gains are those of the saved matrix
        assert metrics["preprocess"]["op_norm"] > 1
    # ater-eval builds the model without preprocessing and loads the checkpoint into it
    model = build_model(ckpt["config"]["model"], (3, 32, 32), 10)
    model.load_state_dict(ckpt["model"])
    assert isinstance(model.preprocess, preprocessing.ZCA) == zca


def test_mnist5k_recipe_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = train_cli(["--config", "mnist-5k", "--method", "ater", "--updates-per-epoch", "2", "--epochs", "1",
                            "--device", "cpu", "--select-subset", "20", "--out", out], capsys)
    assert rc == 0, err
    assert read_metrics(out)["config"]["eps"] == 2.0
    # the run's config.toml is a recipe that repeats the run
    again = resolve(["--config", out / "config.toml", "--device", "cpu", "--out", out])
    saved = {k: v for k, v in read_metrics(out)["config"].items() if k not in ("machine", "torch")}
    assert again == train.TrainConfig(**saved)


def test_mnist_recipe_end_to_end_on_synthetic_idx_files(tmp_path, capsys):
    from test_cli import write_mnist  # torchvision's MNIST layout, a learnable toy

    write_mnist(tmp_path / "data", n_train=60, n_test=20)
    out = tmp_path / "run"
    rc, _, err = train_cli(["--config", "mnist", "--method", "vater", "--data-dir", tmp_path / "data", "--epochs", "1",
                            "--updates-per-epoch", "1", "--val-size", "10", "--select-subset", "5", "--device", "cpu",
                            "--out", out], capsys)
    assert rc == 0, err
    m = read_metrics(out)
    assert m["finished"] and m["config"]["recipe"] == "mnist" and m["config"]["lam"] == 0.1
