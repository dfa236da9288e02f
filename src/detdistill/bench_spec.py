"""The bench spec: which student, teacher, seeds and methods ``detdistill bench`` runs.

A flat YAML file, read with ``yaml.safe_load``; unknown keys are errors (see :mod:`detdistill.bench`
for an example and what the bench does with it).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ConfigError, DistillTermConfig

__all__ = ["BenchMethod", "BenchSpec", "load_spec"]


class BenchMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    distill: list[DistillTermConfig] = Field(default_factory=list)
    overrides: list[str] = Field(default_factory=list)
    teacher_input_scale: float | None = None  # this method's teacher resolution; default: the spec's
    # start the student's neck and head from the teacher's (`teacher.inherit`, distill/inherit.py)
    teacher_inherit: bool = False


class BenchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    student_config: str
    teacher_checkpoint: str | None = None
    teacher_input_scale: float = 1.0
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    overrides: list[str] = Field(default_factory=list)
    methods: list[BenchMethod]
    baseline: str = "alone"
    primary_metric: str = "AP"  # the metric verdicts use, e.g. "AP/car" when rare classes make the class mean noisy
    output_dir: str = "bench_runs/{name}"
    # A finished run is skipped by its final_metrics.json, so its training checkpoint (weights,
    # optimizer and EMA, ~100 MB for FCOS-R18) is only needed to re-score it (`detdistill eval
    # --weights raw`). False deletes it once the run has finished; the exported student stays.
    keep_checkpoints: bool = True


def load_spec(path: str | Path) -> BenchSpec:
    """Read a bench spec with ``safe_load`` and validate it (unknown keys are errors)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
        spec = BenchSpec.model_validate(data)
    except FileNotFoundError:
        raise ConfigError(f"bench spec not found: {path}") from None
    except ValidationError as err:
        raise ConfigError(f"invalid bench spec {path}:\n{err}") from None
    base = path.resolve().parent
    spec.student_config = str((base / spec.student_config).resolve())
    if spec.teacher_checkpoint:
        spec.teacher_checkpoint = str((base / spec.teacher_checkpoint).resolve())
    if spec.baseline not in [m.name for m in spec.methods]:
        raise ConfigError(f"bench spec {path}: baseline {spec.baseline!r} is not among the methods")
    return spec

