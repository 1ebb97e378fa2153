"""Counting the matrix products a computation dispatches (forward and backward:
CPU autograd runs on this thread), by number and by multiply-adds."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountMatmuls(TorchDispatchMode):
    """``count``: matrix products dispatched; ``macs``: their multiply-adds (m * n * k)."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self):
        super().__init__()
        self.count = 0
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.MATMULS:
            self.count += 1
            a, b = (args[1], args[2]) if func is torch.ops.aten.addmm.default else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            self.macs += batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        return func(*args, **(kwargs or {}))
