"""Worker for test_ddp_kd.py: one rank of a CPU (gloo) DDP distillation run.

Kept out of the test module so spawned children import only this file (not pytest's test
module). Both the ranks and the single-process reference build everything through
:func:`setup`, so weights and connectors are identical by construction. Each rank gets its
*own* batch (:func:`make_batch(rank)`): with one shared batch, "averaged over ranks" and
"never reduced" give the same connector gradients, and a test could not tell them apart.

A rank runs two steps: a normal one, then one where rank 1 alone produces a NaN loss term.
Every rank must stop on that step, before touching its weights, naming the term.
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


NAN_TERM = "bbox_regression"


def make_batch(rank: int = 0) -> Batch:
    """Two 96x128 images; rank ``r`` gets different pixels and boxes than any other rank."""
    g = torch.Generator().manual_seed(100 + rank)
    images = [torch.rand(3, 96, 128, generator=g) for _ in range(2)]
    shift = 6.0 * rank
    targets = [Target(torch.tensor([[8.0, 8.0, 24.0, 24.0], [40.0, 20.0, 88.0, 68.0]]) + shift, torch.tensor([0, 1]), 0),
               Target(torch.tensor([[10.0, 3.0, 110.0, 83.0]]) + shift, torch.tensor([2 - rank]), 1)]
    return Batch(images, targets)


def setup(rank: int = 0, method: str = "pkd_l2") -> tuple[Any, nn.Module, Distiller, Batch]:
    """GroupNorm student and teacher (no BatchNorm batch statistics), PKD + L2 terms (or a
    normalised PKD, or ScaleKD, whose assistant runs the DDP student's head a second time), rank's batch."""
    torch.set_num_threads(1)
    adapter = get_adapter("torchvision")
    torch.manual_seed(0)
    student = adapter.build(ModelConfig(arch="fcos", fpn_channels=32, head_convs=1, norm="gn"), 3)
    torch.manual_seed(1)
    teacher = adapter.build(ModelConfig(arch="fcos", fpn_channels=64, head_convs=1, norm="gn"), 3)
    terms = [DistillTermConfig(method="pkd", pairs=[(f"neck.p{lvl}", f"neck.p{lvl}") for lvl in (3, 4, 5)], weight=10.0),
             DistillTermConfig(method="l2", name="l2_p3", pairs=[("neck.p3", "neck.p3")])]
    if method == "pkd_normalized":  # ranks see different ratios task / term: the factor must be their mean
        terms = [DistillTermConfig(method="pkd", pairs=[(f"neck.p{lvl}", f"neck.p{lvl}") for lvl in (3, 4, 5)],
                                   weight=1.0, normalize=True)]
    if method == "scalekd":
        terms = [DistillTermConfig(method="scalekd", pairs=[(f"neck.p{lvl}", f"neck.p{lvl}") for lvl in (3, 4, 5, 6, 7)],
                                   params={"sdf_grad": "student"})]
    torch.manual_seed(2)  # connector initialisation
    distiller = Distiller(student, adapter, terms, Teacher(teacher, adapter))
    return adapter, student, distiller, make_batch(rank)


def one_step(model: nn.Module, adapter: Any, distiller: Distiller, batch: Batch, info: DistInfo) -> dict[str, Any]:
    """One ``train_one_step`` through ``model`` (bare or DDP); the logged values and the connector grads."""
    params = list(unwrap(model).parameters()) + list(distiller.parameters())
    opt = torch.optim.SGD(params, lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    values = train_one_step(model, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller, info=info)
    grads = {k: p.grad.detach().clone() for k, p in distiller.named_parameters() if p.grad is not None}
    return {"values": values, "connector_grads": grads}


def _params(model: nn.Module, distiller: Distiller) -> dict[str, torch.Tensor]:
    named = list(unwrap(model).named_parameters()) + [(f"distiller.{k}", p) for k, p in distiller.named_parameters()]
    return {k: p.detach().clone() for k, p in named}


def run(rank: int, world_size: int, init_file: str, out_dir: str, method: str = "pkd_l2") -> None:
    """Entry point of one spawned rank: write ``rank<k>.pt`` into ``out_dir``."""
    from datetime import timedelta

    from detdistill.engine.train import NonFiniteLossError

    # A short timeout: a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        adapter, student, distiller, batch = setup(rank, method)
        info = DistInfo(rank=rank, world_size=world_size, local_rank=rank)
        model = wrap_ddp(student, info, torch.device("cpu"))
        result = one_step(model, adapter, distiller, batch, info)
        result["wrapped"] = isinstance(model, nn.parallel.DistributedDataParallel)
        result["student_grads"] = {k: p.grad.detach().clone() for k, p in student.named_parameters() if p.grad is not None}
        result["kd_scales"] = distiller.state_dict().get("kd_scales")
        if method != "pkd_l2":
            torch.save(result, Path(out_dir) / f"rank{rank}.pt")
            return

        # Step 2: rank 1 alone gets a NaN task term.
        if rank == 1:
            real = adapter.forward_train

            def nan_forward(m: nn.Module, b: Batch, **kwargs: Any) -> Any:
                losses, raw = real(m, b, **kwargs)
                losses[NAN_TERM] = losses[NAN_TERM] * float("nan")
                return losses, raw

            adapter.forward_train = nan_forward  # instance attribute: this process only
        before = _params(model, distiller)
        try:
            one_step(model, adapter, distiller, batch, info)
            result["nan_step"] = "no error"
        except NonFiniteLossError as err:
            result["nan_step"] = str(err)
        after = _params(model, distiller)
        result["nan_step_changed"] = sorted(k for k in before if not torch.equal(before[k], after[k]))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
