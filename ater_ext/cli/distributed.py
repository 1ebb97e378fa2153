"""torchrun support for ``ater-train``: process group from the environment (gloo
on CPU, nccl on GPU), the device of each rank, the DDP wrapper, and the few
collectives the trainer needs. A plain ``ater-train`` (no torchrun) runs as a
single process with none of this."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .common import CliError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(device: torch.device) -> DistContext:
    """Joins the process group torchrun describes; returns the single-process context otherwise."""
    if not launched_by_torchrun():
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """cuda:LOCAL_RANK for each process under torchrun on GPUs."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def wrap_model(module: nn.Module, device: torch.device, ctx: DistContext, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel (with SyncBatchNorm when asked) under torchrun, else ``module``."""
    if sync_bn:
        if device.type != "cuda":
            raise CliError("--sync-bn: PyTorch's SyncBatchNorm runs only on CUDA modules; drop --sync-bn on CPU")
        if not ctx.enabled:
            raise CliError("--sync-bn needs several processes: launch with torchrun --nproc_per_node N")
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if not ctx.enabled:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_ranks(values: Dict[str, float], ctx: DistContext, device: torch.device) -> Dict[str, float]:
    if not ctx.enabled or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / ctx.world_size).tolist()))


def all_true(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (``flag`` itself for a single process)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj, ctx: DistContext) -> List[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` for a single process)."""
    if not ctx.enabled:
        return [obj]
    out: List[Optional[object]] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Destroys the process group once nothing uses it any more.

    A DDP module can sit in a reference cycle (a process's first one does), so dropping its last name does
    not free it, and its reducer keeps the process group alive. Left to
    interpreter shutdown, that teardown runs while Python finalises, where a
    backend thread that needs the GIL can abort the process (SIGABRT, "terminate
    called without an active exception"); so the cycles are collected first.
    (When training raised, its traceback still holds the trainer: that failing
    run's group is destroyed with the module alive, as before.)
    """
    if ctx.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
