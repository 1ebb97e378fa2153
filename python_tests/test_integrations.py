"""Integrations (issue 16, items 4 to 7): PyTorch Lightning and Hugging Face
Accelerate give the plain loop's update, the README's integration snippets run
as written (torchrun's with two processes), every documented ``ater_ext.x.y``
name resolves after a bare ``import ater_ext``, and the package imports without
Lightning or Accelerate."""
from __future__ import annotations

import copy
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import ater_ext
from ater_ext import attacks
from ater_ext.objectives import ater_loss

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Use it in your training loop"
ATER = dict(eps_adv=2.0, eps=2.0, lam=0.1)


def readme_snippet(heading: str) -> str:
    """The python block under ``#### heading`` of the training-loop section."""
    section = README.read_text().split(f"{SECTION}\n", 1)[1].split("\n## ", 1)[0]
    part = section.split(f"#### {heading}\n", 1)[1].split("\n###", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", part, flags=re.S)
    assert blocks, f"no python block under '#### {heading}'"
    return blocks[0]


def run_snippet(heading: str) -> dict:
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(readme_snippet(heading), f"README.md: {heading}", "exec"), namespace)
    return namespace


def digits(n_train=128, n_val=64, batch=32):
    data = ater_ext.data.load_dataset("digits")
    train = DataLoader(TensorDataset(data.x_train[:n_train], data.y_train[:n_train]), batch_size=batch)
    val = DataLoader(TensorDataset(data.x_test[:n_val], data.y_test[:n_val]), batch_size=batch)
    return train, val


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def plain_loop(net, loader, lr):
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    for x, y in loader:
        loss, _ = ater_loss(net, x, y, **ATER)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


def assert_same_state(a: nn.Module, b: nn.Module):
    for (name, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(t, u, rtol=1e-6, atol=1e-7, msg=name)


# ------------------------------------------------------------------ Lightning
def _trainer(pl, tmp_path, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=str(tmp_path), **kw)


def test_lightning_module_trains_as_the_plain_loop_and_validates_under_attack(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from ater_ext.integrations.lightning import ATERModule

    train, val = digits()
    net = small_net()
    expected = plain_loop(copy.deepcopy(net), train, lr=1e-2)
    module = ATERModule(net, lr=1e-2, **ATER, attack="pgd_l2", attack_eps=1.0, attack_kwargs={"steps": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging
        _trainer(pl, tmp_path, inference_mode=False).fit(module, train, val)
    assert_same_state(module.net, expected)
    assert list(tmp_path.iterdir()) == []  # quiet: nothing written
    metrics = {k: float(v) for k, v in module.trainer.callback_metrics.items()}
    # the logged validation figures are the attack's on the trained net (two equal batches: mean of means)
    net.eval()
    clean, robust = [], []
    for x, y in val:
        x_adv = attacks.pgd_l2(net, x, y, 1.0, steps=3)
        with torch.no_grad():
            clean.append((net(x).argmax(1) == y).float().mean())
            robust.append((net(x_adv).argmax(1) == y).float().mean())
    assert metrics["val/acc"] == pytest.approx(float(torch.stack(clean).mean()), abs=1e-6)
    assert metrics["val/robust_acc"] == pytest.approx(float(torch.stack(robust).mean()), abs=1e-6)
    assert metrics["val/robust_acc"] <= metrics["val/acc"]
    assert {"train/loss", "train/ce", "train/adv", "train/energy"} <= set(metrics)


def test_lightning_inference_mode_gives_the_option_to_set(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from ater_ext.integrations.lightning import ATERModule

    _, val = digits()
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match=r"Trainer\s+with inference_mode=False"):
        warnings.simplefilter("ignore")
        _trainer(pl, tmp_path).validate(ATERModule(small_net()), val)


def test_lightning_readme_snippet_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pytorch_lightning")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        namespace = run_snippet("PyTorch Lightning")
    metrics = namespace["trainer"].callback_metrics
    assert 0 <= float(metrics["val/robust_acc"]) <= float(metrics["val/acc"]) <= 1
    assert "val/acc" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ Accelerate
@pytest.fixture
def fresh_accelerate_state():
    accelerate = pytest.importorskip("accelerate")
    yield accelerate
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def test_accelerate_prepared_training_is_the_plain_loop(fresh_accelerate_state):
    train, _ = digits()
    net = small_net()
    expected = plain_loop(copy.deepcopy(net), train, lr=1e-2)
    accelerator = fresh_accelerate_state.Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(net, torch.optim.Adam(net.parameters(), lr=1e-2), train)
    steps = 0
    for x, y in loader:
        loss, _ = ater_loss(model, x, y, **ATER)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        steps += 1
    assert steps == len(train)
    assert_same_state(accelerator.unwrap_model(model), expected)


def test_accelerate_readme_snippet_runs(fresh_accelerate_state, capsys):
    namespace = run_snippet("Hugging Face Accelerate")
    assert float(capsys.readouterr().out.split("loss ")[1]) > 0
    assert all(torch.isfinite(p).all() for p in namespace["model"].parameters())


# ------------------------------------------------------- the other snippets
def test_plain_loop_readme_snippet_runs(capsys):
    namespace = run_snippet("A plain PyTorch loop")
    assert "'energy'" in capsys.readouterr().out
    assert all(p.grad is not None for p in namespace["model"].parameters())


def test_module_form_readme_snippet_runs(capsys):
    namespace = run_snippet("Module forms")
    out = capsys.readouterr().out
    assert "ATERLoss(eps_adv=2.0, eps=2.0, lam=0.1" in out
    assert "['adv', 'ce', 'energy', 'loss', 'xmax_grad_ratio']" in out
    assert isinstance(namespace["criterion"], nn.Module)


def test_any_output_readme_snippet_runs():
    namespace = run_snippet("Models that return a tuple, a dict or a `ModelOutput`")
    assert 0 <= float(namespace["accuracy"]) <= 1
    assert all(p.grad is not None for p in namespace["model"].parameters())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_readme_snippet_runs_on_two_processes(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(readme_snippet("Your own loop under torchrun (DDP)"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), str(script)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(re.findall(r"rank (\d): loss \d", done.stdout)) == ["0", "1"], done.stdout


# ------------------------------------------------------- documented names
# SPEC.md section 2 lives outside the repository: its names, copied.
SPEC_NAMES = ["energy_reg", "x_max", "objectives.erm_loss", "objectives.at_loss", "objectives.vat_loss",
              "objectives.ater_loss", "objectives.vater_loss", "ops.normalized_step", "ops.fd_direction",
              "ops.row_norm", "reference", "attacks.fgsm", "attacks.pgd_l2", "attacks.pgd_linf", "metrics.energy"]

WALK = textwrap.dedent(r'''
    import importlib.util, re, sys
    text, spec_names = sys.argv[1], sys.argv[2].split(",")
    import ater_ext
    bare_import_took_lightning = "pytorch_lightning" in sys.modules
    names = set(spec_names)
    # ater_ext.a.b, or ater_ext.a.{b, c}; not torch.ops.ater_ext.*, not file paths
    for m in re.finditer(r"(?<![\w./])ater_ext((?:\.\w+)+)(?:\.\{([^}]*)\})?", text):
        if re.search(r"\.(py|cpp|h|cu|md)$", m.group(0)):
            continue
        base = m.group(1)[1:]
        if text[max(0, m.start() - 3):m.start()] == "-m ":  # a module to run: python -m ater_ext.x.y
            assert importlib.util.find_spec("ater_ext." + base) is not None, base
            continue
        leaves = [s.strip() for s in m.group(2).split(",")] if m.group(2) else [""]
        names.update(base + ("." + leaf if leaf else "") for leaf in leaves)
    for name in sorted(names):
        obj = ater_ext
        for part in name.split("."):
            obj = getattr(obj, part)  # AttributeError names what is missing
    print(len(names), "names resolved;", bare_import_took_lightning)
''')


def test_every_documented_name_resolves_after_import_ater_ext():
    """In a fresh interpreter (nothing else imported a submodule first)."""
    done = subprocess.run([sys.executable, "-c", WALK, README.read_text(), ",".join(SPEC_NAMES)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    count = int(done.stdout.split()[0])
    assert count >= 25, done.stdout  # README's names plus SPEC's: the walk really parsed something
    assert done.stdout.strip().endswith("False"), "a bare import ater_ext must not import Lightning"


BLOCKED = textwrap.dedent(r'''
    import importlib.abc, sys
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pytorch_lightning", "lightning", "lightning_fabric", "accelerate"):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Blocker())
    import torch, ater_ext
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
    loss, _ = ater_ext.objectives.ater_loss(model, x, y)
    loss.backward()
    ater_ext.attacks.pgd_l2(model, x, y, 0.5)
    ater_ext.ATERLoss()(model, x, y)
    try:
        ater_ext.integrations.lightning
    except ImportError as exc:
        print("lightning only where used:", exc)
''')


def test_imports_and_runs_without_lightning_or_accelerate():
    done = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lightning only where used: pytorch_lightning is blocked" in done.stdout
