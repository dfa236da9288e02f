"""Flat, validated run configuration.

A config is one YAML file read with ``yaml.safe_load`` (no tags, no code, no
``_base_`` inheritance) and validated by pydantic models that forbid unknown keys.
Errors name the offending key (dotted path) and, for unknown keys, list the
allowed ones.

Paths to *inputs* (datasets, weights, teacher checkpoints) are resolved relative
to the config file's folder, so a config works from any working directory;
``output_dir`` is relative to the current directory, like most training tools.
"""

from __future__ import annotations

import re

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


#: What ``train.device`` (and ``predict --device``) accept.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which detector to build and how big it is."""

    framework: str = "torchvision"
    arch: str = "fcos"
    backbone: str = "resnet18"
    fpn_channels: int = Field(64, gt=0)
    head_convs: int = Field(4, ge=1)
    norm: Literal["bn", "gn", "frozen_bn"] = "bn"
    anchor_sizes: list[int] | None = None
    # FCOS heads end in relu(bbox_reg(x)) with a zero bias: from scratch the whole regression
    # branch can die (GIoU loss stuck at 1.0). A positive bias (1.0 = stride-sized boxes) keeps
    # it alive. None keeps torchvision's init.
    reg_bias_init: float | None = None
    weights: str | None = None
    # Framework-specific settings the generic keys do not cover, checked by the framework's
    # adapter (transformers DETRs: their config's own names, e.g. num_queries, decoder_layers).
    options: dict[str, Any] = Field(default_factory=dict)
    score_thresh: float = Field(0.05, ge=0.0, le=1.0)
    nms_thresh: float = Field(0.6, gt=0.0, le=1.0)
    detections_per_img: int = Field(100, gt=0)


class DataSourceConfig(_Strict):
    """One split of a dataset in one of the registered formats."""

    format: Literal["coco", "yolo", "voc", "visdrone"]
    path: str
    images: str | None = None
    classes: list[str] | str | None = None
    split: str | None = None  # key of an ultralytics dataset.yaml; defaults to train/val by position
    others: Literal["ignore", "class", "drop"] | None = None  # visdrone: category 11; default ignore

    @model_validator(mode="after")
    def _format_options(self) -> "DataSourceConfig":
        if self.others is not None and self.format != "visdrone":
            raise ValueError(f"`others` applies to format visdrone, not {self.format}")
        if self.format == "visdrone" and (self.classes is not None or self.images is not None):
            raise ValueError("format visdrone has fixed classes and an images/ folder under `path`: "
                             "remove `classes` / `images`")
        return self


class DataConfig(_Strict):
    train: DataSourceConfig
    val: DataSourceConfig
    crop_size: int = Field(256, gt=0)
    scale_range: tuple[float, float] = (0.75, 1.33)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    vflip: float = Field(0.0, ge=0.0, le=1.0)
    object_centered_crop_p: float = Field(0.5, ge=0.0, le=1.0)
    min_box_size: float = Field(1.0, ge=0.0)
    strict: bool = False
    cache_images: bool = True
    workers: int = Field(2, ge=0)
    verify_images: bool = False  # decode every image when the data loads: a corrupt file fails at once, named
    # Tuning without touching val: carve this fraction of the *train* images (fixed by
    # tune_seed) as a `tune` split; the run trains on the rest and evaluates on it (data/splits.py).
    tune_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    tune_seed: int = 0


class TrainConfig(_Strict):
    steps: int = Field(400, gt=0)
    batch_size: int = Field(8, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    milestones: list[float] = Field(default_factory=lambda: [0.67, 0.89])
    gamma: float = Field(0.1, gt=0.0)
    grad_clip: float | None = 10.0
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    device: str = "auto"
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)
    ckpt_every: int = Field(100, ge=0)
    # An exponential moving average of the weights is what evaluation, export and a teacher
    # checkpoint use (engine/ema.py): decay ramps as ema_decay * (1 - exp(-t / ema_warmup_steps)).
    ema: bool = True
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0)
    ema_warmup_steps: float = Field(50.0, gt=0.0)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(DEVICE_PATTERN, v):
            raise ValueError(f"{v!r} is not a device: use auto, cpu, cuda or cuda:N")
        return v

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < m < 1.0 for m in v) or v != sorted(v):
            raise ValueError("milestones are increasing fractions of train.steps in (0, 1)")
        return v


class EvalConfig(_Strict):
    max_dets: int = Field(100, gt=0)
    tile_size: int = Field(0, ge=0)
    tile_overlap: int = Field(64, ge=0)
    max_images: int | None = None

    @model_validator(mode="after")
    def _overlap(self) -> "EvalConfig":
        if self.tile_size and self.tile_overlap >= self.tile_size:
            raise ValueError("eval.tile_overlap must be smaller than eval.tile_size")
        return self


class TeacherConfig(_Strict):
    """A frozen teacher, loaded from a checkpoint written by ``detdistill train``."""

    checkpoint: str
    input_scale: float = Field(1.0, gt=0.0)
    # Inheriting strategy (ICD, FGD, PKD): start the student's neck and head (everything outside its
    # backbone) from the teacher's weights; needs the same neck/head design. See distill/inherit.py.
    inherit: bool = False


class DistillTermConfig(_Strict):
    """One KD term: ``weight * method(student taps, teacher taps)``.

    ``pairs`` lists ``[student_tap, teacher_tap]`` names (see ``detdistill list MODEL``);
    methods without a teacher (MSSD) pair two student taps. ``params`` are the
    method's keyword arguments and are checked against its signature.
    """

    method: str
    name: str | None = None
    pairs: list[tuple[str, str]] = Field(default_factory=list)
    weight: float | None = Field(None, ge=0.0)  # None: the method's default_weight (`detdistill list`)
    warmup_steps: int = Field(0, ge=0)
    # Scale each part of the term once, at its first non-zero step, to the task loss: weight 1 then
    # starts it equal to the detection loss (from-scratch feature magnitudes vary a lot). Fixed after.
    normalize: bool = False
    connector: Literal["auto", "conv1x1", "conv1x1_bn", "none"] = "auto"
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.method


class Config(_Strict):
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs/{name}"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    teacher: TeacherConfig | None = None
    distill: list[DistillTermConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_terms(self) -> "Config":
        labels = [t.label for t in self.distill]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"distill terms need unique names; give `name:` to {sorted(dup)}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


_PATH_KEYS = (("data", "train", "path"), ("data", "train", "images"), ("data", "train", "classes"),
              ("data", "val", "path"), ("data", "val", "images"), ("data", "val", "classes"),
              ("model", "weights"), ("teacher", "checkpoint"))


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for 'allowed keys' hints)."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = None
        for c in candidates:
            for cc in [c, *getattr(c, "__args__", ())]:
                if isinstance(cc, type) and issubclass(cc, BaseModel):
                    nxt = cc
        if nxt is None:
            return None
        model = nxt
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _explain(err: ValidationError, source: str) -> ConfigError:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = _model_at(tuple(e["loc"]))
            allowed = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"  unknown key `{key}`; allowed keys here: {allowed}")
        elif e["type"] == "missing":
            lines.append(f"  missing required key `{key}`")
        else:
            lines.append(f"  `{key}`: {e['msg']} (got {e.get('input')!r})")
    return ConfigError("\n".join(lines))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=200"`` -> (["train", "steps"], 200); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, _, raw = text.partition("=")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if part.isdigit() and isinstance(node, list):
                node = node[int(part)]
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {text!r}: `{part}` is not a section")
        last = path[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for keys in _PATH_KEYS:
        node: Any = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            p = Path(node[keys[-1]]).expanduser()
            node[keys[-1]] = str(p if p.is_absolute() else (base / p).resolve())


def config_from_dict(data: dict[str, Any], *, base_dir: Path | None = None, source: str = "<dict>") -> Config:
    """Validate a plain dict (already parsed YAML); relative input paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping at the top level, got {type(data).__name__}")
    if base_dir is not None:
        _resolve_paths(data, base_dir)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _explain(err, source) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config with ``safe_load``, apply ``key=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, base_dir=path.resolve().parent, source=str(path))
