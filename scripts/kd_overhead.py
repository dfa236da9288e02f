"""Distillation overhead: one KD step vs (one student step + one teacher forward), same batches.

    .venv/bin/python scripts/kd_overhead.py configs/aerial_student_fcos_r18_pkd.yaml [--steps 10]

The three measurements are interleaved step by step (student step, teacher forward, KD
step on the same batch) so machine noise hits all three alike; medians are reported.
Target for feature losses: ratio <= 1.10. The teacher checkpoint named in the config must
exist (or pass --random-teacher to time with a randomly initialised teacher of the same
architecture, which costs the same).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from detdistill.adapters.base import get_adapter
from detdistill.config import load_config
from detdistill.data.dataset import StepBatchSampler, TrainDataset, collate
from detdistill.distill.distiller import Distiller, Teacher
from detdistill.engine.optim import build_optimizer, build_scheduler
from detdistill.data.splits import load_split
from detdistill.data.transforms import train_transform
from detdistill.engine.setup import load_teacher
from detdistill.engine.train import train_one_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--teacher-config", help="with --random-teacher: the teacher's train config")
    ap.add_argument("--random-teacher", action="store_true")
    args = ap.parse_args()
    cfg = load_config(args.config)
    torch.manual_seed(0)
    train_set = load_split(cfg, "train")
    adapter = get_adapter(cfg.model.framework)
    if args.random_teacher:
        tcfg = load_config(args.teacher_config)
        tmodel = get_adapter(tcfg.model.framework).build(tcfg.model, train_set.num_classes).eval()
        teacher = Teacher(tmodel, get_adapter(tcfg.model.framework), cfg.teacher.input_scale if cfg.teacher else 1.0)
    else:
        teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    d = cfg.data
    ds = TrainDataset(train_set, train_transform(d), cache_images=True)
    sampler = iter(StepBatchSampler(len(train_set), cfg.train.batch_size, 0))
    batches = [collate([ds[i] for i in next(sampler)]) for _ in range(args.steps + 2)]

    plain = adapter.build(cfg.model, train_set.num_classes)
    student = copy.deepcopy(plain)
    distiller = Distiller(student, adapter, cfg.distill, teacher)
    opt_p = build_optimizer(cfg.train, list(plain.parameters()))
    opt_s = build_optimizer(cfg.train, list(student.parameters()) + list(distiller.parameters()),
                            distiller.optimizer_overrides())  # e.g. ScaleKD's assistant trains with its own Adam
    sch_p, sch_s = build_scheduler(cfg.train, opt_p), build_scheduler(cfg.train, opt_s)
    need_head = distiller.need_teacher_head
    t_plain, t_teacher, t_kd = [], [], []
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        train_one_step(plain, adapter, batch, 100 + step, optimizer=opt_p, scheduler=sch_p, grad_clip=cfg.train.grad_clip)
        t1 = time.perf_counter()
        distiller.teacher_forward(batch)  # at the teacher's input scale, as the KD step runs it
        t2 = time.perf_counter()
        train_one_step(student, adapter, batch, 100 + step, optimizer=opt_s, scheduler=sch_s, distiller=distiller,
                       grad_clip=cfg.train.grad_clip)
        t3 = time.perf_counter()
        if step >= 2:
            t_plain.append(t1 - t0), t_teacher.append(t2 - t1), t_kd.append(t3 - t2)
    a, b, c = (statistics.median(x) for x in (t_plain, t_teacher, t_kd))
    print(f"{cfg.name}: methods {[t.method for t in cfg.distill]}, batch {cfg.train.batch_size}x{d.crop_size}px, "
          f"{args.steps} timed steps, torch threads {torch.get_num_threads()}")
    print(f"  student step         {a * 1000:8.0f} ms")
    print(f"  teacher forward      {b * 1000:8.0f} ms  (head run: {need_head}, input scale {teacher.input_scale})")
    print(f"  distillation step    {c * 1000:8.0f} ms")
    print(f"  ratio KD / (student + teacher) = {c / (a + b):.3f}")


if __name__ == "__main__":
    main()
