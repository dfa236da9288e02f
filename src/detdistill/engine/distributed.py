"""torchrun / DistributedDataParallel plumbing (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux ``prctl``).

    torchrun forwards SIGINT/SIGTERM to its ranks, but a launcher killed with SIGKILL (or an
    OOM kill) forwards nothing, and the ranks would train on as orphans. Returns whether it
    could be set (False off Linux). torch itself offers no such option.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may have died before the prctl: then we are already an orphan.
    return os.getppid() != 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    exit_with_parent()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # find_unused_parameters: detection heads skip branches for batches without boxes.
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics).

    Each rank's BatchNorm sees only its share of the batch, so after a step the ranks' running
    statistics differ; DDP copies rank 0's at the start of the next forward. Doing it right after
    the step instead keeps everything read between steps (the EMA update, a sharded evaluation)
    the same on every rank.
    """
    if not info.enabled:
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)


def all_reduce_grads(params: list[nn.Parameter], info: DistInfo) -> None:
    """Average gradients of parameters that live outside the DDP-wrapped model (KD connectors)."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(info.world_size)


def mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The mean of each logged value over the ranks (every rank passes the same keys)."""
    if not info.enabled:
        return values
    keys = sorted(values)
    mean = reduce_mean(torch.tensor([values[k] for k in keys], dtype=torch.float64), info)
    return dict(zip(keys, mean.tolist()))


def reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` in one process). Pickles: keep it off
    the hot path (it is used to name what went wrong on another rank)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
