"""Spawned ranks for test_distributed_helpers.py (importable by name, not a test module)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from detdistill.engine.distributed import DistInfo, mean_over_ranks


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        info = DistInfo(rank=rank, world_size=world_size, local_rank=rank)
        got = mean_over_ranks({"loss": 1.0 + rank, "loss/kd/pkd": 10.0 * rank, "lr": 0.01}, info)
        torch.save(got, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
