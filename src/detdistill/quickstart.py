"""``detdistill quickstart``: the whole point of the library, on a sample shipped in the package.

Trains a teacher, the student alone and the student distilled with the method that won the
tune sweep and the val bench (:data:`QUICKSTART_KD_TERMS`) on 15 aerial
images (KIT AIS, CC BY 3.0, see ``assets/quickstart/ATTRIBUTION.md``), then prints one
table. Sized for a 2-core CPU: a few minutes end to end. The schedule is far too short
for reliable method comparisons (that is what ``detdistill bench`` is for); it shows the
moving parts working end to end.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

from .config import Config, config_from_dict
from .engine.train import train
from .report.plots import plot_bars
from .report.tables import format_metrics_table

QUICKSTART_STEPS = {"teacher": 240, "student": 160}
FIGURE_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "AP/car"]
# The KD terms that did best on the tune split and then on val (docs/benchmarks.md, "Verdicts on val"):
# KL on the head's class logits at weight 3 plus box KD (the teacher's box distances where it is
# confident) at weight 1, each scaled to the detection loss at its first step: +12.4 car AP over the
# student alone, every metric on 5 of 5 paired seeds, and above KL 1 + box 1 on 4 of 5. PKD was the
# quickstart's method first; at weight 0.3 it cost AP on this from-scratch pair.
QUICKSTART_KD_TERMS: list[dict[str, Any]] = [{"method": "kl", "weight": 3.0, "normalize": True},
                                             {"method": "box", "weight": 1.0, "normalize": True}]
QUICKSTART_KD_LABEL = "student + KL + box KD"


def sample_dir() -> Path:
    """Folder of the embedded sample (YOLO format: images/, labels/, train.txt, val.txt, classes.txt)."""
    return Path(str(resources.files("detdistill") / "assets" / "quickstart"))


def quickstart_config(name: str, out: Path, *, backbone: str, fpn: int, steps: int, teacher: Path | None = None) -> Config:
    root = sample_dir()
    data: dict[str, Any] = {
        "name": name,
        "seed": 0,
        "output_dir": str(out / name),
        "model": {"arch": "fcos", "backbone": backbone, "fpn_channels": fpn, "head_convs": 2, "reg_bias_init": 1.0},
        "data": {
            "train": {"format": "yolo", "path": str(root / "train.txt"), "classes": str(root / "classes.txt")},
            "val": {"format": "yolo", "path": str(root / "val.txt"), "classes": str(root / "classes.txt")},
            "crop_size": 256, "workers": 0, "scale_range": [0.8, 1.25], "hflip": 0.5, "vflip": 0.5,
        },
        "train": {"steps": steps, "batch_size": 4, "lr": 0.01, "warmup_steps": 30, "log_every": 10, "ckpt_every": 0},
    }
    if teacher is not None:
        data["teacher"] = {"checkpoint": str(teacher)}
        # normalize: the term starts at `weight` x the detection loss, whatever the raw scale of the
        # from-scratch logits (a fixed weight made PKD ~10x the task loss here for the whole run)
        data["distill"] = [dict(t) for t in QUICKSTART_KD_TERMS]
    return config_from_dict(data)


def run_quickstart(out: Path, *, steps: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Train teacher, student alone and distilled student; print and return the comparison rows."""
    t_steps = steps * 3 // 2 if steps else QUICKSTART_STEPS["teacher"]
    s_steps = steps or QUICKSTART_STEPS["student"]
    print(f"detdistill quickstart: sample data in {sample_dir()} (KIT AIS Data Set, CC BY 3.0)")
    print(f"outputs in {out}/; teacher {t_steps} steps, students {s_steps} steps, batch 4 x 256 px crops, CPU-sized")
    plan = [
        ("teacher (FCOS-R34, FPN 128)", quickstart_config("teacher", out, backbone="resnet34", fpn=128, steps=t_steps)),
        ("student alone (FCOS-R18, FPN 64)", quickstart_config("student", out, backbone="resnet18", fpn=64, steps=s_steps)),
    ]
    rows = []
    for label, cfg in plan:
        print(f"\n== {label}")
        t0 = time.perf_counter()
        r = train(cfg, resume=True, progress=progress)
        rows.append({"name": label, **(r.final.as_dict() if r.final else {}), "s/step": r.sec_per_step,
                     "minutes": (time.perf_counter() - t0) / 60})
    teacher_ckpt = out / "teacher" / "checkpoints" / "last.pt"
    cfg = quickstart_config("student_kd", out, backbone="resnet18", fpn=64, steps=s_steps, teacher=teacher_ckpt)
    weights = ", ".join(f"{t['method']} {t['weight']}" for t in QUICKSTART_KD_TERMS)
    print(f"\n== {QUICKSTART_KD_LABEL} from the teacher (each term's weight x the task loss at the start: {weights})")
    t0 = time.perf_counter()
    r = train(cfg, resume=True, progress=progress)
    rows.append({"name": QUICKSTART_KD_LABEL, **(r.final.as_dict() if r.final else {}), "s/step": r.sec_per_step,
                 "minutes": (time.perf_counter() - t0) / 60})
    print()
    print(format_metrics_table(rows, ["name", "AP", "AP50", "AP75", "APs", "APm", "AP/car", "s/step", "minutes"],
                               title="quickstart: val AP on 4 held-out aerial images (one seed, short schedule)"))
    alone, kd = rows[1], rows[2]
    gains = ", ".join(f"{m} {kd[m] - alone[m]:+.1f}" for m in ("AP/car", "AP", "APs")
                      if isinstance(kd.get(m), float) and isinstance(alone.get(m), float))
    if gains:
        print(f"\ndistillation vs the student alone: {gains} (one seed, a short schedule: read it as a demo, "
              "not a verdict)")
    figure = plot_bars([{"name": r["name"], **{m: r.get(m) for m in FIGURE_METRICS}} for r in rows], FIGURE_METRICS,
                       out / "comparison.png", f"quickstart: teacher, student alone, {QUICKSTART_KD_LABEL} (val, one seed)")
    print(f"comparison figure: {figure}")
    print(f"training curves: {out}/*/loss_curves.png and ap_curves.png; student-only export: {out}/student_kd/export/")
    print("a short single-seed run is noisy: use `detdistill bench` for method comparisons over paired seeds")
    return rows
