"""ater_ext.models: the paper's MLP, conv-large and a LeNet-5, their shapes and errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ater_ext.data import DATASETS
from ater_ext.models import MODELS, build_model, default_model

SHAPES = {"mnist": (1, 28, 28), "digits": (1, 8, 8), "cifar10": (3, 32, 32)}
VALID = [("mlp", s) for s in SHAPES] + [("conv-large", "cifar10"), ("conv-large", "mnist")] + \
        [("lenet", s) for s in SHAPES]


def _count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name, shape_key", VALID)
@pytest.mark.parametrize("num_classes", [10, 3])
def test_output_shape_train_and_eval(name, shape_key, num_classes):
    shape = SHAPES[shape_key]
    model = build_model(name, shape, num_classes)
    x = torch.rand(4, *shape)
    assert model(x).shape == (4, num_classes)
    model.eval()
    out = model(x[:1])
    assert out.shape == (1, num_classes) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_models_backprop_to_input():
    for name, shape in (("mlp", (1, 8, 8)), ("conv-large", (3, 12, 12)), ("lenet", (1, 8, 8))):
        x = torch.rand(2, *shape, requires_grad=True)
        build_model(name, shape, 10)(x).sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_mlp_parameter_count_and_layout():
    model = build_model("mlp", (1, 28, 28), 10)
    linear = (784 * 1200 + 1200) + (1200 * 600 + 600) + (600 * 300 + 300) + (300 * 150 + 150) + (150 * 10 + 10)
    bn = 2 * (1200 + 600 + 300 + 150)
    assert linear + bn == 1_894_060
    assert sum(p.numel() for p in model.parameters()) == 1_894_060
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == \
        [(784, 1200), (1200, 600), (600, 300), (300, 150), (150, 10)]
    assert [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm1d)] == [1200, 600, 300, 150]
    assert _count(model, nn.ReLU) == 4
    # Linear -> BatchNorm1d -> ReLU for every hidden layer, a bare Linear at the end
    seq = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.ReLU))]
    assert [type(m) for m in seq] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 4 + [nn.Linear]
    assert build_model("mlp", (3, 32, 32), 10).net[1].in_features == 3072


def test_conv_large_layout():
    model = build_model("conv-large", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.padding) for m in convs] == [
        (3, 128, (3, 3), (1, 1)), (128, 128, (3, 3), (1, 1)), (128, 128, (3, 3), (1, 1)),
        (128, 256, (3, 3), (1, 1)), (256, 256, (3, 3), (1, 1)), (256, 256, (3, 3), (1, 1)),
        (256, 512, (3, 3), (0, 0)), (512, 256, (1, 1), (0, 0)), (256, 128, (1, 1), (0, 0)),
    ]
    assert _count(model, nn.BatchNorm2d) == 9 and _count(model, nn.LeakyReLU) == 9
    assert all(m.negative_slope == 0.1 for m in model.modules() if isinstance(m, nn.LeakyReLU))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)
    assert _count(model, nn.MaxPool2d) == 2 and _count(model, nn.AdaptiveAvgPool2d) == 1
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and (linears[0].in_features, linears[0].out_features) == (128, 10)
    # order: each conv followed by its BatchNorm and LeakyReLU; pool -> dropout after convs 3 and 6
    kinds = [type(m) for m in model.net]
    conv_at = [i for i, k in enumerate(kinds) if k is nn.Conv2d]
    for i in conv_at:
        assert kinds[i + 1] is nn.BatchNorm2d and kinds[i + 2] is nn.LeakyReLU
    for i in (conv_at[2], conv_at[5]):
        assert kinds[i + 3] is nn.MaxPool2d and kinds[i + 4] is nn.Dropout
    assert kinds[-3:] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]


def test_conv_large_dropout_only_in_training():
    model = build_model("conv-large", (3, 12, 12), 10)
    x = torch.rand(3, 3, 12, 12)
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_lenet_layout_and_padding():
    # 28x28: classic LeNet-5 after the padded first conv: 14 -> 10 -> 5, so 16 * 5 * 5 features
    m28 = build_model("lenet", (1, 28, 28), 10)
    assert m28.classifier[0].in_features == 400 and m28.features[3].padding == (0, 0)
    assert [m.out_features for m in m28.modules() if isinstance(m, nn.Linear)] == [120, 84, 10]
    assert _count(m28, nn.ReLU) == 4 and _count(m28, nn.MaxPool2d) == 2
    assert build_model("lenet", (3, 32, 32), 10).classifier[0].in_features == 16 * 6 * 6
    # 8x8 digits: the second conv is padded, 8 -> 4 -> 4 -> 2
    m8 = build_model("lenet", (1, 8, 8), 10)
    assert m8.features[3].padding == (2, 2) and m8.classifier[0].in_features == 16 * 2 * 2
    for side in range(4, 14):  # every size from the smallest allowed on
        assert build_model("lenet", (1, side, side), 10)(torch.rand(2, 1, side, side)).shape == (2, 10)


def test_conv_large_smallest_input():
    assert build_model("conv-large", (1, 12, 12), 10)(torch.rand(2, 1, 12, 12)).shape == (2, 10)
    assert build_model("conv-large", (1, 15, 40), 10)(torch.rand(2, 1, 15, 40)).shape == (2, 10)


@pytest.mark.parametrize("name, shape, match", [
    ("conv-large", (1, 8, 8), "too small"),
    ("conv-large", (3, 11, 32), "too small"),
    ("conv-large", (3, 32, 11), ">= 12"),
    ("lenet", (1, 3, 3), "too small"),
    ("mlp", (784,), r"\(C, H, W\)"),
    ("lenet", (1, 0, 28), r"\(C, H, W\)"),
    ("mlp", (1, 28.5, 28), r"\(C, H, W\)"),
    ("resnet", (3, 32, 32), "unknown model 'resnet'.*mlp, conv-large, lenet"),
])
def test_build_errors(name, shape, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, shape, 10)


def test_num_classes_checked():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", (1, 8, 8), 1)


def test_default_model():
    assert {d: default_model(d) for d in DATASETS} == {
        "mnist-5k": "mlp", "digits": "mlp", "mnist": "mlp", "fashion-mnist": "mlp",
        "cifar10": "conv-large", "svhn": "conv-large"}
    assert all(default_model(d) in MODELS for d in DATASETS)
    with pytest.raises(ValueError, match="unknown dataset"):
        default_model("imagenet")
