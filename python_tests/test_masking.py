"""The gradient-masking report flags a model that masks its gradients on
purpose (a piecewise-constant output: zero input gradient almost everywhere,
so gradient attacks see it as robust) and passes the same model unmasked."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ater_ext import masking, robustness
from ater_ext.data import load_dataset
from ater_ext.models import build_model

EPS = 0.1


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PiecewiseConstant(nn.Module):
    """Logits rounded to multiples of 1/2: the same decisions, but an input gradient that is 0."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.round(self.inner(x) * 2) / 2


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build_model("lenet", data.input_shape, data.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        perm = torch.randperm(len(data.x_train))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    idx = torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(0))[:100]
    return model, data.x_test[idx], data.y_test[idx]


def _by_name(report):
    return {c.name: c for c in report.checks}


def test_masked_model_is_flagged_while_plain_pgd_looks_robust(trained):
    model, x, y = trained
    masked = PiecewiseConstant(model)
    pgd = robustness.attack_accuracy(masked, x, y, "pgd-linf", EPS, steps=10)
    clean = robustness.attack_accuracy(masked, x, y, "pgd-linf", 0.0)
    assert pgd == clean > 80, "the masked model should look perfectly robust to plain PGD"
    assert robustness.attack_accuracy(model, x, y, "pgd-linf", EPS, steps=10) < pgd - 20

    report = masking.masking_report(masked, x, y, norm="linf", eps=EPS, surrogate=model, square_queries=500,
                                    tolerance=3.0, progress=False)
    checks = _by_name(report)
    assert not report.passed and "gradient masking suspected" in report.verdict
    for name in ("large_radius", "black_box", "transfer"):
        assert not checks[name].passed, checks[name].summary
    assert checks["large_radius"].numbers["curve"][-1]["accuracy"] == pytest.approx(clean)
    assert checks["transfer"].numbers["transfer_accuracy"] < clean - 20
    assert checks["black_box"].numbers["square_broke_percent"] > 10


def test_clean_model_passes(trained):
    model, x, y = trained
    report = masking.masking_report(model, x, y, norm="linf", eps=EPS, surrogate=model, square_queries=500,
                                    tolerance=3.0, progress=False)
    assert report.passed, masking.render_markdown({"clean": report})
    assert {c.name for c in report.checks} == {"more_steps", "single_step", "large_radius", "black_box", "transfer"}
    md = masking.render_markdown({"clean LeNet": report})
    assert "## clean LeNet" in md and md.count("| pass |") == 5
    d = report.to_dict()
    assert d["passed"] is True and len(d["checks"]) == 5


def test_autoattack_warnings_are_surfaced(trained):
    model, x, y = trained
    masked = PiecewiseConstant(model)
    x, y = x[:30], y[:30]
    aa = robustness.autoattack(masked, x, y, norm="linf", eps=EPS, progress=False, square_queries=300)
    assert aa.version == "custom"
    assert any("zero gradient" in w for w in aa.warnings), aa.warnings
    report = masking.masking_report(masked, x, y, norm="linf", eps=EPS, autoattack=aa, progress=False)
    checks = _by_name(report)
    assert not checks["autoattack_warnings"].passed
    assert "zero gradient" in checks["autoattack_warnings"].summary
    assert "AutoAttack's Square stage" in checks["black_box"].numbers["source"]
    with pytest.raises(ValueError, match="AutoAttack result is for linf eps=0.1"):
        masking.masking_report(masked, x, y, norm="l2", eps=EPS, autoattack=aa, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(norm="l1", eps=0.1), "norm must be one of"),
    (dict(norm="linf", eps=-1.0), "eps must be finite and > 0"),
    (dict(norm="linf", eps=0.1, tolerance=float("nan")), "tolerance must be finite"),
])
def test_bad_input(kwargs, match, trained):
    model, x, y = trained
    with pytest.raises(ValueError, match=match):
        masking.masking_report(model, x[:4], y[:4], progress=False, **kwargs)
