"""Spawned ranks for test_ddp.py's whole-run EMA check (importable by name, not a test module)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml


def run(rank: int, world_size: int, port: int, config_path: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from detdistill.config import config_from_dict
    from detdistill.engine import train as train_mod

    runs = []
    build_run = train_mod.build_run

    def keep(*args, **kwargs):  # the Run object, to read this rank's live EMA after training
        runs.append(build_run(*args, **kwargs))
        return runs[-1]

    train_mod.build_run = keep
    cfg = config_from_dict(yaml.safe_load(Path(config_path).read_text()))
    train_mod.train(cfg, resume=False, progress=False, log=lambda _m: None)
    torch.save({"ema": runs[0].ema.state_dict(), "model": runs[0].model.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
