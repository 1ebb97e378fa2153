"""Model factories that the command-line tests pass to ``ater-eval --model-factory``."""
from __future__ import annotations

from torch import nn

from ater_ext.models import build_model


class DictOutput(nn.Module):
    """A LeNet whose forward returns ``{"logits": ..., "features": ...}``, as many model zoos do."""

    def __init__(self):
        super().__init__()
        self.net = build_model("lenet", (1, 8, 8), 10)

    def forward(self, x):
        logits = self.net(x)
        return {"features": logits.detach(), "logits": logits}


def dict_lenet() -> nn.Module:
    return DictOutput()
