"""The ``output=`` option (issue 16, item 2): models whose output is a tuple, a
dict or a Hugging Face ``ModelOutput``-style object work everywhere a model is
called, and give the same values as the plain-logits model through the
reference; without ``output=`` a non-tensor output gets one error naming it."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import ater_ext
from ater_ext import attacks, metrics
from ater_ext import objectives as O
from ater_ext import reference as R
from ater_ext.outputs import resolve_output

from _models import close, close_grads, make, param_grads


class FakeModelOutput(OrderedDict):
    """What transformers' ``ModelOutput`` is: a dict with attribute access whose
    integer index counts the fields that are not None (transformers is not installed)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, k):
        if isinstance(k, str):
            return super().__getitem__(k)
        return self.to_tuple()[k]

    def to_tuple(self):
        return tuple(v for v in self.values() if v is not None)


class Wrapped(nn.Module):
    """``net``'s logits inside another output structure."""

    def __init__(self, net: nn.Module, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, x.flatten(1).sum(1)
        if self.kind == "dict":
            return {"features": x, "logits": logits}
        if self.kind == "model_output":
            return FakeModelOutput(loss=None, logits=logits, hidden_states=x)
        return {"head": [None, logits]}  # "callable"


SPECS = {"tuple": 0, "dict": "logits", "model_output": "logits", "callable": lambda out: out["head"][1]}
SPEC_IDS = list(SPECS)


def _wrapped(kind, model_kind="bn"):
    net, x, y = make(model_kind)
    return net, Wrapped(net, kind), SPECS[kind], x, y


@pytest.mark.parametrize("kind", SPEC_IDS)
def test_energy_reg_and_x_max_with_any_output_match_reference(kind):
    net, model, spec, x, y = _wrapped(kind)
    got = ater_ext.energy_reg(model, x, y, output=spec, reduction="none")
    want = R.ref_energy_reg(net, x, y, reduction="none")
    close(got, want, 1e-9, f"energy_reg, {kind} output")
    close_grads(param_grads(got.sum(), net), param_grads(want.sum(), net), 1e-9, "grads")
    close(ater_ext.x_max(model, x, y, output=spec), R.ref_x_max(net, x, y), 1e-9, "x_max")


def test_model_output_by_index_and_compiled_passes(dynamo_reset):
    net, x, y = make("tanh")
    model = Wrapped(net, "model_output")
    close(ater_ext.x_max(model, x, y, output=0), R.ref_x_max(net, x, y), 1e-9, "ModelOutput[0]")
    # compiled: rounding differences amplified by the finite difference's 1 / xi = 1e6
    close(ater_ext.x_max(model, x, y, output="logits", compile=True), R.ref_x_max(net, x, y), 1e-6,
          "compiled passes with output=")


@pytest.mark.parametrize("kind", SPEC_IDS)
def test_objectives_with_any_output_match_reference(kind):
    net, model, spec, x, y = _wrapped(kind)
    pairs = {
        "erm": (lambda: O.erm_loss(model, x, y, output=spec)[0], lambda: R.ref_erm_loss(net, x, y)),
        "at": (lambda: O.at_loss(model, x, y, output=spec)[0], lambda: R.ref_at_loss(net, x, y)),
        "vat": (lambda: O.vat_loss(model, x, output=spec)[0], lambda: R.ref_vat_loss(net, x)),
        "ater": (lambda: O.ater_loss(model, x, y, output=spec)[0], lambda: R.ref_ater_loss(net, x, y)),
        # the TypeError: unhashable type: 'slice'
        "vater": (lambda: O.vater_loss(model, x[:6], y[:6], x[6:], output=spec)[0],
                  lambda: R.ref_vater_loss(net, x[:6], y[:6], x[6:])),
    }
    for name, (ours, ref) in pairs.items():
        torch.manual_seed(3)
        got = ours()
        torch.manual_seed(3)
        want = ref()
        close(got, want, 1e-9, f"{name}, {kind} output")
        close_grads(param_grads(got, net), param_grads(want, net), 1e-9, f"{name} grads")


@pytest.mark.parametrize("kind", SPEC_IDS)
def test_attacks_and_metrics_with_any_output(kind):
    net, model, spec, x, y = _wrapped(kind, "tanh")
    x = x.sigmoid()  # inside the default clamp range
    for attack in (attacks.fgsm, attacks.pgd_l2, attacks.pgd_linf):
        close(attack(model, x, y, 0.3, output=spec), attack(net, x, y, 0.3), 1e-12, attack.__name__)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    got = metrics.energy(model, x, y, 0.5, 4, output=spec, generator=gen())
    want = metrics.energy(net, x, y, 0.5, 4, generator=gen())
    for key in want:
        close(got[key], want[key], 1e-12, key)


CALLERS = {
    "energy_reg": lambda m, x, y, **kw: ater_ext.energy_reg(m, x, y, **kw),
    "x_max": lambda m, x, y, **kw: ater_ext.x_max(m, x, y, **kw),
    "erm_loss": lambda m, x, y, **kw: O.erm_loss(m, x, y, **kw),
    "at_loss": lambda m, x, y, **kw: O.at_loss(m, x, y, **kw),
    "vat_loss": lambda m, x, y, **kw: O.vat_loss(m, x, **kw),
    "ater_loss": lambda m, x, y, **kw: O.ater_loss(m, x, y, **kw),
    "vater_loss": lambda m, x, y, **kw: O.vater_loss(m, x[:4], y[:4], x[4:], **kw),
    "pgd_l2": lambda m, x, y, **kw: attacks.pgd_l2(m, x, y, 0.5, **kw),
    "energy": lambda m, x, y, **kw: metrics.energy(m, x, y, 0.5, 2, **kw),
}


@pytest.mark.parametrize("kind", ["tuple", "dict", "model_output"])
@pytest.mark.parametrize("caller", list(CALLERS))
def test_non_tensor_output_without_the_option_names_it(caller, kind):
    _, model, _, x, y = _wrapped(kind, "tanh")
    with pytest.raises(TypeError, match=rf"ater_ext\.{caller}: the model returned .*not a logits tensor; "
                                        rf"pass output="):
        CALLERS[caller](model, x, y)


def test_bad_specs_and_wrong_picks_name_the_option():
    _, model, _, x, y = _wrapped("dict", "tanh")
    with pytest.raises(ValueError, match="energy_reg: output must be None, a key"):
        ater_ext.energy_reg(model, x, y, output=1.5)
    with pytest.raises(TypeError, match=r"output='score' is not a key .*\['features', 'logits'\]"):
        ater_ext.energy_reg(model, x, y, output="score")
    with pytest.raises(TypeError, match="output=0 is an index, but the model returned a dict"):
        ater_ext.x_max(model, x, y, output=0)
    with pytest.raises(TypeError, match="it must pick the logits tensor"):
        ater_ext.x_max(model, x, y, output=lambda out: out.keys())
    _, tup, _, _, _ = _wrapped("tuple", "tanh")
    with pytest.raises(TypeError, match="cannot take output=5"):
        ater_ext.x_max(tup, x, y, output=5)


def test_resolve_output_is_the_one_resolver():
    logits = torch.randn(3, 4)
    assert resolve_output(None)(logits) is logits
    assert resolve_output("logits")(FakeModelOutput(loss=None, logits=logits)) is logits
    assert resolve_output(1)((None, logits)) is logits
    assert resolve_output("logits")(type("Out", (), {"logits": logits})()) is logits  # an attribute
    with pytest.raises(TypeError, match="ater_ext.my_eval: the model returned a tuple of length 2"):
        resolve_output(None, op="my_eval")((logits, logits))
