"""ultralytics' own built-in distillation vs its student alone, on detdistill's exact data stream.

    .venv/bin/python scripts/ultralytics_builtin_kd.py \
        --student-config configs/aerial_yolov8n.yaml \
        --teacher bench_runs/aerial_teacher_yolov8s/checkpoints/last.pt \
        --out bench_runs/ultralytics_builtin_kd

Needs `pip install -e ".[yolo]"` and an ultralytics release whose trainer has ``distill_model``
(8.4.x: ``DistillationModel``, score-weighted L2 on the Detect-head inputs through an MLP
projector, weight ``dis``). Runs ultralytics' *trainer* twice — the student alone and the student
with ``distill_model=<teacher>`` — and COCO-evaluates both with detdistill's evaluator on the whole
val images, so the numbers sit next to detdistill's own runs (`detdistill train
configs/aerial_yolov8n.yaml`, `... aerial_yolov8n_pkd.yaml`).

What is made equal, and how:

- **Data.** The ``steps x batch_size`` training crops that ``detdistill train`` draws for the
  student config's seed are written to disk once (same crops, same order of draws) and the
  ultralytics runs train one epoch over them at ``imgsz`` = the crop size, with every
  ultralytics augmentation (mosaic, HSV, flips, affine) off. ultralytics shuffles them.
- **Schedule.** Same optimiser steps, batch, SGD lr / momentum / weight decay and gradient clip
  (ultralytics clips at 10 too); ``nbs`` = batch so ultralytics does not accumulate gradients.
  Differences left as they are: ultralytics warms up for at least 100 iterations (detdistill:
  the config's ``warmup_steps``), then, with a single epoch, keeps ``lr0`` constant where
  detdistill decays it by cosine; it saves an EMA of the weights, which this short a run keeps
  close to the raw weights (decay ramps from 0). Both ultralytics runs share these, so the
  distillation gain is read against ultralytics' own student-alone run.
- **Teacher.** The detdistill teacher checkpoint (safetensors weights, restored by detdistill) is
  handed to ultralytics' ``DistillationModel`` as the in-memory ``DetectionModel``, through a
  trainer subclass (:func:`distilling_trainer`), so both libraries distil from bit-identical
  weights and no pickled model is written or read by this script. (ultralytics' trainer still
  writes its own ``weights/last.pt``; nothing here loads it: the student is taken from the
  trainer's in-memory EMA, in float32, and saved as safetensors.)

Nothing under ``../shared`` is written: val images are symlinked and their labels copied into
``--out`` (ultralytics writes a ``labels.cache`` beside the label folder). Prints a table and
writes ``results.json`` / ``results.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: no DNS probe, no hub

import torch
from PIL import Image
from torch import nn
from safetensors.torch import save_file
from tqdm import tqdm

from detdistill.adapters.base import get_adapter
from detdistill.config import Config, load_config
from detdistill.data.dataset import EvalDataset, StepBatchSampler, TrainDataset
from detdistill.data.transforms import EvalTransform
from detdistill.data.yolo import label_path_for
from detdistill.engine.evaluate import evaluate
from detdistill.engine.restore import restore_model
from detdistill.data.splits import load_split
from detdistill.data.transforms import train_transform
from detdistill.report.tables import format_metrics_table

COLUMNS = ["name", "AP", "AP50", "AP75", "APs", "APm", "APl", "AP/car", "s_per_step", "train_min"]


def write_crops(cfg: Config, out: Path) -> Path:
    """The crops ``detdistill train`` would draw for ``cfg`` as a YOLO image/label folder."""
    img_dir, lab_dir = out / "images", out / "labels"
    done = out / "DONE"
    if done.exists():
        return img_dir
    shutil.rmtree(out, ignore_errors=True)
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    d = cfg.data
    train_set = load_split(cfg, "train")
    ds = TrainDataset(train_set, train_transform(d), cache_images=True)
    sampler = StepBatchSampler(len(train_set), cfg.train.batch_size, cfg.seed)
    for step in tqdm(range(cfg.train.steps), desc="writing detdistill's training crops", unit="step"):
        for j, item in enumerate(sampler.batch(step)):
            image, target = ds[item]
            name = f"s{step:05d}_{j}"
            h, w = image.shape[-2:]
            arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(img_dir / f"{name}.png")
            lines = []
            for (x0, y0, x1, y1), c in zip(target.boxes.tolist(), target.labels.tolist()):
                lines.append(f"{c} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}")
            (lab_dir / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    done.write_text("ok\n")
    return img_dir


def mirror_val(cfg: Config, out: Path) -> Path:
    """Symlinks to the val images plus copies of their YOLO labels, as ultralytics expects them."""
    img_dir, lab_dir = out / "images", out / "labels"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    val = load_split(cfg, "val")
    for s in val.samples:
        src = Path(s.path)
        link = img_dir / src.name
        if not link.exists():
            link.symlink_to(src.resolve())
        label = label_path_for(src)
        if label.exists():
            shutil.copyfile(label, lab_dir / f"{src.stem}.txt")
    return img_dir


def write_dataset(cfg: Config, folder: Path) -> Path:
    """detdistill's training crops and the val split as an ultralytics dataset; returns its YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    train_dir = write_crops(cfg, folder / "train")
    val_dir = mirror_val(cfg, folder / "val")
    names = load_split(cfg, "val").class_names
    data_yaml = folder / "dataset.yaml"
    data_yaml.write_text(json.dumps({"path": str(folder), "train": str(train_dir), "val": str(val_dir),
                                     "names": dict(enumerate(names))}, indent=1))  # JSON is valid YAML
    return data_yaml


def load_teacher(checkpoint: Path) -> tuple[nn.Module, str]:
    """The detdistill teacher as an ultralytics ``DetectionModel`` in eval mode, and its arch.

    detdistill's checkpoints hold state dicts, so this reads no pickled module.
    """
    r = restore_model(checkpoint, "cpu")
    if r.config.model.framework != "ultralytics":
        raise SystemExit(f"{checkpoint}: ultralytics' distillation needs an ultralytics teacher, "
                         f"this one is {r.config.model.framework}/{r.config.model.arch}")
    return r.model.float().eval(), r.config.model.arch


def distilling_trainer(teacher: nn.Module) -> type:
    """A ``DetectionTrainer`` subclass that distils from the in-memory ``teacher``.

    ultralytics' ``distill_model=`` argument takes a checkpoint *path* (a pickled model); its
    ``DistillationModel`` also takes a module, and the trainer leaves a model that is already a
    ``DistillationModel`` alone (its resume path builds one the same way). So the student is
    wrapped right after the trainer has attached ``args`` (imgsz, ``dis``), names and ``nc`` to it.
    """
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.distill_model import DistillationModel

    class InMemoryTeacherTrainer(DetectionTrainer):
        def set_model_attributes(self) -> None:
            super().set_model_attributes()
            # a copy: DistillationModel freezes and moves its teacher, the caller's stays as it was
            self.model = DistillationModel(teacher_model=copy.deepcopy(teacher), student_model=self.model)

    return InMemoryTeacherTrainer


class UltralyticsRun(NamedTuple):
    weights: Path  # the student's float32 state dict, as safetensors
    s_per_step: float
    trainer: Any  # the finished ultralytics trainer (tests inspect its model)


def train_ultralytics(arch: str, data_yaml: Path, cfg: Config, out: Path, name: str, teacher: nn.Module | None,
                      dis: float, steps: int) -> UltralyticsRun:
    """One ultralytics trainer run, distilling from ``teacher`` when one is given."""
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionTrainer

    t = cfg.train
    model = YOLO(f"{arch}.yaml", task="detect")
    start = time.perf_counter()
    model.train(
        data=str(data_yaml), epochs=1, imgsz=cfg.data.crop_size, batch=t.batch_size, nbs=t.batch_size,
        optimizer="SGD", lr0=t.lr, lrf=1.0, momentum=t.momentum, weight_decay=t.weight_decay,
        warmup_epochs=t.warmup_steps / steps, warmup_bias_lr=0.0, warmup_momentum=t.momentum,
        mosaic=0.0, mixup=0.0, copy_paste=0.0, close_mosaic=0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, degrees=0.0,
        translate=0.0, scale=0.0, shear=0.0, perspective=0.0, fliplr=0.0, flipud=0.0, rect=False,
        pretrained=False, amp=False, device="cpu", workers=0, seed=cfg.seed, deterministic=True, plots=False,
        val=False, project=str(out), name=name, exist_ok=True, verbose=False, dis=dis,
        trainer=distilling_trainer(teacher) if teacher is not None else DetectionTrainer,
    )
    per_step = (time.perf_counter() - start) / steps
    # The trainer's EMA in memory (float32; last.pt holds a float16 copy, as a pickle)
    student = model.trainer.ema.ema
    student = getattr(student, "student_model", student)  # a DistillationModel wraps the student
    dest = out / name / "student.safetensors"
    save_file({k: v.float().contiguous() for k, v in student.state_dict().items()}, str(dest))
    return UltralyticsRun(dest, per_step, model.trainer)


def eval_student(cfg: Config, weights: Path) -> dict:
    model_cfg = cfg.model.model_copy(update={"weights": str(weights)})
    adapter = get_adapter("ultralytics")
    val = load_split(cfg, "val")
    model = adapter.build(model_cfg, len(val.class_names)).eval()
    with torch.no_grad():
        res = evaluate(model, adapter, EvalDataset(val, EvalTransform()), cfg.eval, torch.device("cpu"),
                       nms_thresh=cfg.model.nms_thresh)
    row = res.as_dict()
    row.update({f"AP/{k}": v for k, v in res.per_class_AP.items()})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student-config", required=True, help="a detdistill config with model.framework: ultralytics")
    ap.add_argument("--teacher", required=True, type=Path, help="a `detdistill train` checkpoint of an ultralytics model")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dis", type=float, default=6.0, help="ultralytics' distillation weight (its default: 6.0)")
    ap.add_argument("--runs", nargs="+", default=["alone", "builtin_kd"], choices=["alone", "builtin_kd"])
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the student config, as for `detdistill train`")
    args = ap.parse_args()

    cfg = load_config(args.student_config, args.overrides)
    if cfg.model.framework != "ultralytics":
        raise SystemExit(f"{args.student_config}: model.framework must be ultralytics")
    out = args.out.resolve()
    data_yaml = write_dataset(cfg, out / "data")
    teacher, t_arch = load_teacher(args.teacher)
    print(f"teacher {t_arch} from {args.teacher}; student {cfg.model.arch}")

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for run in args.runs:
        if run in results:
            print(f"{run}: done already ({results_path})")
            continue
        weights, per_step, _ = train_ultralytics(cfg.model.arch, data_yaml, cfg, out, run,
                                                 teacher if run == "builtin_kd" else None, args.dis, cfg.train.steps)
        row = eval_student(cfg, weights)
        row.update({"name": f"ultralytics {run}", "s_per_step": per_step, "train_min": per_step * cfg.train.steps / 60})
        results[run] = row
        results_path.write_text(json.dumps(results, indent=1))
    rows = list(results.values())
    table = format_metrics_table(rows, COLUMNS)
    print(table)
    (out / "results.md").write_text(
        f"teacher {t_arch} ({args.teacher}), student {cfg.model.arch}, {cfg.train.steps} steps x "
        f"{cfg.train.batch_size} crops of {cfg.data.crop_size} px, seed {cfg.seed}, dis {args.dis}\n\n{table}\n")


if __name__ == "__main__":
    main()
