"""The networks of the paper's experiments.

``build_model(name, input_shape, num_classes)`` builds one of :data:`MODELS`
for images ``[B, C, H, W]`` and returns logits ``[B, num_classes]``:

``mlp``
    The paper's MNIST MLP: flatten -> 1200 -> 600 -> 300 -> 150 -> classes,
    ``Linear -> BatchNorm1d -> ReLU`` for every hidden layer (784-1200-600-300-150-10
    on MNIST: 1,894,060 parameters).
``conv-large``
    The CIFAR-10 / SVHN network of Miyato et al. (2018, VAT):
    3x[conv3x3 128, pad 1] -> maxpool 2 -> dropout 0.5 -> 3x[conv3x3 256, pad 1] ->
    maxpool 2 -> dropout 0.5 -> conv3x3 512 (valid) -> conv1x1 256 -> conv1x1 128 ->
    global average pool -> linear, ``BatchNorm2d -> LeakyReLU(0.1)`` after every conv
    (the convolutions have no bias: the BatchNorm that follows has one). Needs
    ``H, W >= 12`` so that the valid 3x3 conv still sees at least 3x3 pixels
    after the two poolings.
``lenet``
    A LeNet-5-style CNN: conv5x5 6 (pad 2) -> ReLU -> maxpool 2 -> conv5x5 16 ->
    ReLU -> maxpool 2 -> fc 120 -> ReLU -> fc 84 -> ReLU -> fc classes. The second
    conv is unpadded (as in LeNet-5) for ``H, W >= 12`` and padded by 2 for
    smaller images (8x8 digits), so any ``H, W >= 4`` works; the flattened size
    is computed here, no lazy modules.

The models take the data as :mod:`ater_ext.data` gives it (pixels in
``[0, 1]``). Each has a ``preprocess`` slot at its front, ``nn.Identity()``
unless a fixed preprocessing layer (:mod:`ater_ext.preprocessing`, e.g. ZCA
whitening) is put there with :func:`set_preprocess`; its buffers are part of the
``state_dict``, and a model built without one grows it when it loads a
``state_dict`` that has one, so ``build_model(...).load_state_dict(ckpt)``
works for either kind of checkpoint.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

from torch import nn

from . import preprocessing

__all__ = ["MODELS", "build_model", "default_model", "set_preprocess", "MLP", "ConvLarge", "LeNet"]

MODELS = ("mlp", "conv-large", "lenet")

_DEFAULTS = {
    "mnist-5k": "mlp",
    "digits": "mlp",
    "mnist": "mlp",
    "fashion-mnist": "mlp",
    "cifar10": "conv-large",
    "svhn": "conv-large",
}


def default_model(dataset: str) -> str:
    """The paper's model for ``dataset``: the MLP for the MNIST-like sets, conv-large for CIFAR-10 / SVHN."""
    try:
        return _DEFAULTS[dataset]
    except KeyError:
        raise ValueError(f"default_model: unknown dataset {dataset!r}; known: {', '.join(_DEFAULTS)}") from None


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) for inputs ``[B, *input_shape]``.

    ``input_shape`` is ``(C, H, W)``. Raises ``ValueError`` for an unknown
    name, a malformed shape, ``num_classes < 2``, or an image too small for
    the model.
    """
    shape = _check_shape(name, input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"build_model({name!r}): num_classes must be an int >= 2, got {num_classes!r}")
    if name == "mlp":
        return MLP(shape, num_classes)
    if name == "conv-large":
        return ConvLarge(shape, num_classes)
    if name == "lenet":
        return LeNet(shape, num_classes)
    raise ValueError(f"build_model: unknown model {name!r}; choose one of {', '.join(MODELS)}")


def set_preprocess(model: nn.Module, layer: Optional[nn.Module]) -> nn.Module:
    """Put the fixed preprocessing ``layer`` (None: none) at the front of a
    model of :data:`MODELS`; returns the model."""
    if not isinstance(model, _Preprocessed):
        raise ValueError(f"set_preprocess: {type(model).__name__} is not one of ater_ext's models")
    model.preprocess = nn.Identity() if layer is None else layer
    return model


class _Preprocessed(nn.Module):
    """A model with a ``preprocess`` slot (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.preprocess: nn.Module = nn.Identity()
        self.register_load_state_dict_pre_hook(_grow_preprocess)


def _grow_preprocess(module: _Preprocessed, state_dict, prefix, *args) -> None:
    """Load-time hook: a state_dict with preprocessing buffers gives the model that layer first."""
    if isinstance(module.preprocess, nn.Identity):
        layer = preprocessing.from_state_dict(state_dict, prefix + "preprocess.")
        if layer is not None:
            module.preprocess = layer.to(next(iter(module.parameters())).device)


def _check_shape(name: str, input_shape: Sequence[int]) -> Tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in input_shape)
        ok = len(shape) == 3 and all(s >= 1 and s == t for s, t in zip(shape, input_shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"build_model({name!r}): input_shape must be (C, H, W) with positive ints, "
                         f"got {input_shape!r}")
    return shape  # type: ignore[return-value]


class MLP(_Preprocessed):
    """flatten -> [Linear -> BatchNorm1d -> ReLU] x 4 (1200, 600, 300, 150) -> Linear.

    x: [B, C, H, W] (or anything with ``prod(input_shape)`` features per row)  out: [B, num_classes]
    """

    HIDDEN = (1200, 600, 300, 150)

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        layers: list = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in self.HIDDEN:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(self.preprocess(x))


def _conv_bn_lrelu(c_in: int, c_out: int, k: int, pad: int) -> list:
    return [nn.Conv2d(c_in, c_out, k, padding=pad, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]


class ConvLarge(_Preprocessed):
    """conv-large of Miyato et al. (2018); see the module docstring.

    x: [B, C, H, W] with H, W >= 12  out: [B, num_classes]
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        # two 2x2 max-pools (floor), then an unpadded 3x3 conv that must leave >= 1 pixel
        h_out, w_out = h // 2 // 2 - 2, w // 2 // 2 - 2
        if h_out < 1 or w_out < 1:
            raise ValueError(f"build_model('conv-large'): input {tuple(input_shape)} is too small; H and W must be "
                             f">= 12 (two 2x2 pools leave {h // 4}x{w // 4} pixels, the valid 3x3 conv needs >= 3x3)")
        layers = _conv_bn_lrelu(c, 128, 3, 1) + _conv_bn_lrelu(128, 128, 3, 1) + _conv_bn_lrelu(128, 128, 3, 1)
        layers += [nn.MaxPool2d(2), nn.Dropout(0.5)]
        layers += _conv_bn_lrelu(128, 256, 3, 1) + _conv_bn_lrelu(256, 256, 3, 1) + _conv_bn_lrelu(256, 256, 3, 1)
        layers += [nn.MaxPool2d(2), nn.Dropout(0.5)]
        layers += _conv_bn_lrelu(256, 512, 3, 0) + _conv_bn_lrelu(512, 256, 1, 0) + _conv_bn_lrelu(256, 128, 1, 0)
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(self.preprocess(x))


class LeNet(_Preprocessed):
    """LeNet-5-style CNN; see the module docstring.

    x: [B, C, H, W] with H, W >= 4  out: [B, num_classes]
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        if h < 4 or w < 4:
            raise ValueError(f"build_model('lenet'): input {tuple(input_shape)} is too small; H and W must be >= 4")
        h1, w1 = h // 2, w // 2  # conv5x5 pad 2 keeps the size, then pool
        # LeNet-5's second conv is unpadded; keep that while two pixels survive to the second pool.
        pad2 = 0 if min(h1, w1) - 4 >= 2 else 2
        h2, w2 = (h1 + 2 * pad2 - 4) // 2, (w1 + 2 * pad2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * h2 * w2, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(self.preprocess(x)))
