"""Everything a training run needs before its first step, built from a config: :func:`build_run`.

Device and DDP, data, student, teacher and Distiller, optimiser, schedule and AMP, and the
state restored from a checkpoint. The loop in :mod:`detdistill.engine.train` only steps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from ..adapters.base import DetectorAdapter, get_adapter
from ..config import Config, TeacherConfig
from ..data.dataset import EvalDataset, StepBatchSampler, TrainDataset, collate
from ..data.sample import DetectionSet
from ..data.splits import load_split
from ..data.transforms import EvalTransform, train_transform
from ..distill.distiller import Distiller, Teacher, normalize_caveats
from ..distill.inherit import inherit_neck_and_head
from ..modules import unwrap
from .checkpoint import load_checkpoint, remove_stale_temporaries, set_rng_state
from .device import resolve_device, seed_everything
from .distributed import DistInfo, init_distributed, wrap_ddp
from .ema import build_ema
from .environment import extend_history, pairing_key, run_environment
from .optim import build_optimizer, build_scheduler
from .restore import restore_model


@dataclass
class Run:
    """A training run ready to step (see :func:`build_run`)."""

    cfg: Config
    device: torch.device
    info: DistInfo
    say: Callable[[str], None]
    train_set: DetectionSet
    val_set: DetectionSet
    adapter: DetectorAdapter
    model: nn.Module  # bare
    ddp_model: nn.Module  # what the loop calls (DDP-wrapped under torchrun)
    distiller: Distiller | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    start: int
    loader: DataLoader
    val_ds: EvalDataset
    ema: AveragedModel | None = None  # the weights evaluated and exported, when train.ema
    # The environments the run has trained in, oldest first, this one last (engine.environment).
    environments: list[dict[str, Any]] = field(default_factory=list)

    @property
    def eval_model(self) -> nn.Module:
        """The model evaluation and export use: the EMA weights when kept, else the weights."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def ckpt_dir(self) -> Path:
        return self.cfg.run_dir / "checkpoints"


def load_teacher(tcfg: TeacherConfig, device: torch.device) -> Teacher:
    """The frozen teacher from a ``detdistill train`` checkpoint."""
    r = restore_model(tcfg.checkpoint, device)
    return Teacher(r.model, r.adapter, tcfg.input_scale, r.class_names)


def make_autocast(cfg: Config, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    mode = cfg.train.amp
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return contextlib.nullcontext
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    if mode == "auto" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


#: Config sections whose change makes a checkpoint's weights or KD state meaningless to resume.
RESUME_SECTIONS = ("model", "distill")


def check_resumable(state: dict[str, Any], cfg: Config, class_names: list[str], path: Path, *, explicit: bool) -> None:
    """Refuse to resume from a checkpoint written under another model, KD terms or classes.

    Compared before any weight is loaded, so the user gets the differing keys instead of a
    ``size mismatch`` traceback. Schedule keys (``train.steps`` ...) may change: extending
    a finished run is a resume.
    """
    saved = _flat({k: v for k, v in (yaml.safe_load(state.get("config") or "") or {}).items() if k in RESUME_SECTIONS})
    now = _flat({k: v for k, v in yaml.safe_load(cfg.to_yaml()).items() if k in RESUME_SECTIONS})
    diffs = [f"{k}: {saved.get(k, '(unset)')!r} in the checkpoint, {now.get(k, '(unset)')!r} now"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if state.get("class_names") is not None and list(state["class_names"]) != list(class_names):
        diffs.append(f"classes: {state['class_names']} in the checkpoint, {class_names} in the data")
    if diffs:
        how = ("pick a checkpoint of this configuration" if explicit else
               f"run with --fresh to start over (it ignores {path}), or set another output_dir")
        raise ValueError(f"the checkpoint {path} does not match this config, so it cannot be resumed: "
                         + "; ".join(diffs[:8]) + (f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else "")
                         + f". {how[0].upper()}{how[1:]}")


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def check_terms(cfg: Config) -> None:
    """Method names, their params and pairs, and the teacher they need: errors in seconds, not
    after the data and the teacher have loaded."""
    from ..distill.methods import METHODS

    for term in cfg.distill:
        method = METHODS.get(term.method)
        method.check_params(term)
        if method.needs(term).teacher and cfg.teacher is None:
            raise ValueError(f"distill term {term.label!r} ({term.method}) needs a teacher: set `teacher.checkpoint`")


def check_training_boxes(train_set: DetectionSet, say: Callable[[str], None]) -> None:
    """No box at all is an error (nothing to learn, AP "-" at the end); mostly missing label files a warning."""
    r = train_set.report
    hint = ("YOLO label files are found by replacing the last `images` folder of each image path with `labels` "
            "and the suffix with .txt; check the format and paths in `data.train`")
    if r.boxes == 0:
        raise ValueError(f"the training split {train_set.source} has no boxes in its {r.images} images "
                         f"({r.background_missing} without a label file, {r.background_empty} with an empty one): "
                         f"nothing to train on. {hint}")
    if r.background_missing > r.images / 2:
        say(f"warning: {r.background_missing} of the {r.images} training images have no label file and train as "
            f"background. {hint}")


def build_run(cfg: Config, *, resume: bool | str | Path = True, log: Callable[[str], None] = print) -> Run:
    """Set up a run of ``cfg``: ``resume=True`` continues from ``<run_dir>/checkpoints/last.pt``
    when it exists, a path continues from that checkpoint, ``False`` starts fresh."""
    device = resolve_device(cfg.train.device)
    info = init_distributed(device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    say = log if info.is_main else (lambda _m: None)
    check_terms(cfg)  # before any data is read or anything is written
    seed_everything(cfg.seed)
    train_set, val_set = load_split(cfg, "train"), load_split(cfg, "val")
    if train_set.class_names != val_set.class_names:
        raise ValueError(f"train and val class names differ: {train_set.class_names} vs {val_set.class_names}")
    say(train_set.summary())
    say(val_set.summary() if val_set.source != train_set.source else f"val: the same set as train ({val_set.source})")
    check_training_boxes(train_set, say)

    adapter = get_adapter(cfg.model.framework)
    model = adapter.build(cfg.model, train_set.num_classes).to(device)
    ckpt_path = Path(resume) if isinstance(resume, (str, Path)) else cfg.run_dir / "checkpoints" / "last.pt"
    resuming = bool(resume) and ckpt_path.is_file()
    distiller = None
    inherit = cfg.teacher is not None and cfg.teacher.inherit
    if cfg.distill or inherit:
        # Paired seeds: building the teacher, its probe passes and the methods' own modules
        # (connectors, ...) draw random numbers; on a forked RNG they leave the stream the student
        # trains on exactly as in the same seed's run without distillation.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            teacher = load_teacher(cfg.teacher, device) if cfg.teacher is not None else None
            if teacher is not None and teacher.class_names != train_set.class_names:
                say(f"note: the teacher's {len(teacher.class_names or [])} classes ({_names(teacher.class_names or [])}) "
                    f"differ from the data's {train_set.num_classes} ({_names(train_set.class_names)}); "
                    "feature KD still works, logit KD refuses")
            # before the Distiller, whose methods may read the student's head; a resume loads its own weights
            if inherit and teacher is not None and not resuming:
                say(inherit_neck_and_head(model, teacher.model, adapter).summary())
            if cfg.distill:
                distiller = Distiller(model, adapter, cfg.distill, teacher, num_classes=train_set.num_classes).to(device)
        for line in normalize_caveats(cfg.distill):
            say(line)
    params = list(model.parameters()) + (list(distiller.parameters()) if distiller is not None else [])
    optimizer = build_optimizer(cfg.train, params, distiller.optimizer_overrides() if distiller is not None else ())
    scheduler = build_scheduler(cfg.train, optimizer)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.train.amp == "fp16" else None

    if info.is_main:
        stale = remove_stale_temporaries(cfg.run_dir / "checkpoints")
        if stale:
            say(f"removed {len(stale)} temporary checkpoint file(s) left by an interrupted write: "
                + ", ".join(p.name for p in stale))
    ema = build_ema(unwrap(model), cfg.train.ema_decay, cfg.train.ema_warmup_steps) if cfg.train.ema else None
    start = 0
    here = run_environment(device)  # recorded with every checkpoint; a resume elsewhere is flagged
    if resuming:
        state = load_checkpoint(ckpt_path)
        check_resumable(state, cfg, train_set.class_names, ckpt_path, explicit=isinstance(resume, (str, Path)))
        unwrap(model).load_state_dict(state["model"])
        if distiller is not None and state.get("distiller"):
            distiller.load_state_dict(state["distiller"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:  # e.g. written before a method's modules got their own optimizer
            raise ValueError(f"the checkpoint {ckpt_path} holds optimizer state that does not fit this run's "
                             f"optimizer ({err}); it was written by another detdistill version or configuration. "
                             "Run with --fresh to start over, or set another output_dir") from None
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start = int(state["step"])
        if ema is not None:
            if state.get("ema"):
                ema.load_state_dict(state["ema"])
            else:  # written without EMA: the average starts from the resumed weights
                say(f"note: {ckpt_path} holds no EMA weights; the EMA starts from the resumed weights")
                ema = build_ema(unwrap(model), cfg.train.ema_decay, cfg.train.ema_warmup_steps)
        say(f"resumed from {ckpt_path} at step {start}")
        # A checkpoint written before runs kept their environments started in an unknown one ({}).
        history = list(state.get("environment_history") or [{}])
        if pairing_key(history[-1]) != pairing_key(here):
            say(f"WARNING: this run resumes in another environment than it trained in so far ({pairing_key(history[-1])}; "
                f"now {pairing_key(here)}): its numbers are no longer those of one environment, and a bench pairs it "
                "with no other run. Rerun it from the start here (--fresh) to pair it.")
    elif isinstance(resume, (str, Path)):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    else:
        history = []
    environments = extend_history(history, here)

    if info.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(cfg.to_yaml())

    d = cfg.data
    train_ds = TrainDataset(train_set, train_transform(d), cache_images=d.cache_images)
    if d.cache_images and d.workers > 0:
        train_ds.preload()  # decode once before workers fork, so they share the cache
    sampler = StepBatchSampler(len(train_set), cfg.train.batch_size, cfg.seed, start_step=start,
                               world_size=info.world_size, rank=info.rank)
    # Own generator: iter(loader) draws a base seed, which must not advance the global torch RNG
    # (restored on resume; Faster R-CNN's box sampling draws from it), or resume is not exact.
    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=d.workers, collate_fn=collate,
                        persistent_workers=d.workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
    return Run(cfg, device, info, say, train_set, val_set, adapter, model, wrap_ddp(model, info, device), distiller,
               optimizer, scheduler, scaler, make_autocast(cfg, device), start, loader, EvalDataset(val_set, EvalTransform()),
               ema, environments)
