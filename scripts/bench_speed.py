"""Training throughput (images/s) and inference latency (ms/image) of detector configs.

    .venv/bin/python scripts/bench_speed.py configs/aerial_teacher_fcos_r34.yaml configs/aerial_student_fcos_r18.yaml

Training steps use real augmented batches from the config's train split (decoded and
prepared before timing, so only the model step is timed). Latency is measured on the
config's val images at native resolution (whole images) and on a fixed 1024x1024 input.
Prints figures; asserts nothing (machines are noisy: compare within one run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from detdistill.adapters.base import get_adapter
from detdistill.config import load_config
from detdistill.data.dataset import EvalDataset, StepBatchSampler, TrainDataset, collate
from detdistill.data.transforms import EvalTransform
from detdistill.engine.optim import build_optimizer, build_scheduler
from detdistill.data.splits import load_split
from detdistill.data.transforms import train_transform
from detdistill.engine.train import train_one_step


def count_params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (after 2 warm-up steps)")
    ap.add_argument("--images", type=int, default=8, help="val images for latency")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print(f"{'config':<34} {'params M':>8} {'train img/s':>11} {'s/step':>7} {'val ms/img':>10} {'1024² ms':>9}")
    for path in args.configs:
        cfg = load_config(path)
        torch.manual_seed(0)
        train_set, val_set = load_split(cfg, "train"), load_split(cfg, "val")
        adapter = get_adapter(cfg.model.framework)
        model = adapter.build(cfg.model, train_set.num_classes)
        d = cfg.data
        ds = TrainDataset(train_set, train_transform(d), cache_images=True)
        sampler = iter(StepBatchSampler(len(train_set), cfg.train.batch_size, 0))
        batches = [collate([ds[i] for i in next(sampler)]) for _ in range(args.steps + 2)]
        opt = build_optimizer(cfg.train, list(model.parameters()))
        sched = build_scheduler(cfg.train, opt)
        times = []
        for step, batch in enumerate(batches):
            t0 = time.perf_counter()
            train_one_step(model, adapter, batch, step + 100, optimizer=opt, scheduler=sched, grad_clip=cfg.train.grad_clip)
            if step >= 2:
                times.append(time.perf_counter() - t0)
        s_step = statistics.median(times)
        model.eval()
        val = EvalDataset(val_set, EvalTransform())
        lat = []
        with torch.no_grad():
            adapter.predict(model, [val[0][0]])  # warm-up
            for i in range(min(args.images, len(val))):
                im = val[i][0]
                t0 = time.perf_counter()
                adapter.predict(model, [im])
                lat.append((time.perf_counter() - t0) * 1000)
            fixed = torch.rand(3, 1024, 1024)
            adapter.predict(model, [fixed])
            t0 = time.perf_counter()
            for _ in range(3):
                adapter.predict(model, [fixed])
            fixed_ms = (time.perf_counter() - t0) / 3 * 1000
        print(f"{cfg.name:<34} {count_params(model):>8.2f} {cfg.train.batch_size / s_step:>11.2f} {s_step:>7.2f} "
              f"{statistics.mean(lat):>10.0f} {fixed_ms:>9.0f}")


if __name__ == "__main__":
    main()
