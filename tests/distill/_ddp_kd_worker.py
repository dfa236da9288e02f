"""Worker for test_ddp_kd.py: one rank of a CPU (gloo) DDP distillation step.

Kept out of the test module so spawned children import only this file (not pytest's test
module). Both the ranks and the single-process reference build everything through
:func:`setup`, so weights, connectors and the batch are identical by construction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from detdistill.adapters.base import get_adapter, unwrap
from detdistill.config import DistillTermConfig, ModelConfig
from detdistill.distill.distiller import Distiller, Teacher
from detdistill.engine.distributed import DistInfo, wrap_ddp
from detdistill.engine.train import train_one_step
from detdistill.structures import Batch, Target

KD_KEYS = ("loss/kd/pkd", "loss/kd/l2_p3")


def make_batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g) for _ in range(2)]
    targets = [Target(torch.tensor([[8.0, 8.0, 24.0, 24.0], [40.0, 20.0, 88.0, 68.0]]), torch.tensor([0, 1]), 0),
               Target(torch.tensor([[10.0, 3.0, 120.0, 93.0]]), torch.tensor([2]), 1)]
    return Batch(images, targets)


def setup() -> tuple[Any, nn.Module, Distiller, Batch]:
    """GroupNorm student and teacher (no BatchNorm batch statistics), PKD + L2 terms, one batch."""
    torch.set_num_threads(1)
    adapter = get_adapter("torchvision")
    torch.manual_seed(0)
    student = adapter.build(ModelConfig(arch="fcos", fpn_channels=32, head_convs=1, norm="gn"), 3)
    torch.manual_seed(1)
    teacher = adapter.build(ModelConfig(arch="fcos", fpn_channels=64, head_convs=1, norm="gn"), 3)
    terms = [DistillTermConfig(method="pkd", pairs=[(f"neck.p{lvl}", f"neck.p{lvl}") for lvl in (3, 4, 5)], weight=10.0),
             DistillTermConfig(method="l2", name="l2_p3", pairs=[("neck.p3", "neck.p3")])]
    torch.manual_seed(2)  # connector initialisation
    distiller = Distiller(student, adapter, terms, Teacher(teacher, adapter))
    return adapter, student, distiller, make_batch()


def one_step(model: nn.Module, adapter: Any, distiller: Distiller, batch: Batch, info: DistInfo) -> dict[str, Any]:
    """One ``train_one_step`` through ``model`` (bare or DDP); the logged values and the connector grads."""
    params = list(unwrap(model).parameters()) + list(distiller.parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    values = train_one_step(model, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller, info=info)
    grads = {k: p.grad.detach().clone() for k, p in distiller.named_parameters() if p.grad is not None}
    return {"values": values, "connector_grads": grads}


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Entry point of one spawned rank: write ``rank<k>.pt`` into ``out_dir``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        adapter, student, distiller, batch = setup()
        info = DistInfo(rank=rank, world_size=world_size, local_rank=rank)
        model = wrap_ddp(student, info, torch.device("cpu"))
        result = one_step(model, adapter, distiller, batch, info)
        result["wrapped"] = isinstance(model, nn.parallel.DistributedDataParallel)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
