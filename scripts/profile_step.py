"""Where one training step of a detector config spends its time: torch profiler, ops by self CPU time.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/profile_step.py configs/aerial_rtdetr_r18.yaml --steps 2

Builds the config's model from random init, prepares real augmented batches from its train split
(before timing), runs two warm-up steps, then profiles ``--steps`` steps and prints each step's
wall time and the top operators. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from detdistill.adapters.base import get_adapter
from detdistill.config import load_config
from detdistill.data.dataset import StepBatchSampler, TrainDataset, collate
from detdistill.data.splits import load_split
from detdistill.data.transforms import train_transform
from detdistill.engine.optim import build_optimizer, build_scheduler
from detdistill.engine.train import train_one_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--rows", type=int, default=25, help="operators to list")
    args = ap.parse_args()
    cfg = load_config(args.config)
    torch.manual_seed(0)
    train_set = load_split(cfg, "train")
    adapter = get_adapter(cfg.model.framework)
    model = adapter.build(cfg.model, train_set.num_classes)
    ds = TrainDataset(train_set, train_transform(cfg.data), cache_images=True)
    sampler = iter(StepBatchSampler(len(train_set), cfg.train.batch_size, 0))
    batches = [collate([ds[i] for i in next(sampler)]) for _ in range(args.steps + 2)]
    opt = build_optimizer(cfg.train, list(model.parameters()))
    sched = build_scheduler(cfg.train, opt)
    print(f"{cfg.name}: torch {torch.__version__}, {torch.get_num_threads()} threads, batch {cfg.train.batch_size}")

    def step(k: int) -> None:
        t0 = time.perf_counter()
        train_one_step(model, adapter, batches[k], k + 100, optimizer=opt, scheduler=sched, grad_clip=cfg.train.grad_clip)
        print(f"  step {k}: {time.perf_counter() - t0:.2f} s")

    for k in range(2):
        step(k)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(2, args.steps + 2):
            step(k)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
