"""The training loop, as plain functions: ``train`` drives ``train_one_step`` and ``evaluate``.

One code path serves plain training and distillation: without KD terms the step loss
is the adapter's task loss; with them a :class:`~detdistill.distill.Distiller` adds the
weighted KD terms. Works in one process or under ``torchrun`` (DDP).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import __version__
from ..adapters.base import DetectorAdapter, get_adapter, unwrap
from ..config import Config, DataConfig, TeacherConfig
from ..data.dataset import EvalDataset, StepBatchSampler, TrainDataset, collate
from ..data.readers import load_detection_set
from ..data.sample import DetectionSet
from ..data.transforms import EvalTransform, TrainTransform
from ..distill.distiller import Distiller, Teacher
from ..report.metrics_log import MetricsLogger
from ..report.plots import plot_run
from ..structures import Batch
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .coco_eval import EvalResult
from .distributed import DistInfo, all_reduce_grads, cleanup, gather_objects, init_distributed, reduce_mean, wrap_ddp
from .evaluate import evaluate
from .optim import build_optimizer, build_scheduler
from .restore import restore_model


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf; the message names the step and the term."""


@dataclass
class TrainResult:
    run_dir: Path
    final: EvalResult | None
    steps: int
    seconds: float
    sec_per_step: float
    peak_mem_mb: float
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_transform(d: DataConfig) -> TrainTransform:
    """The training augmentation a config's ``data`` section describes (also used by the
    benchmark scripts, so they draw exactly the crops ``train`` does)."""
    return TrainTransform(d.crop_size, scale_range=d.scale_range, hflip=d.hflip, vflip=d.vflip,
                          object_centered_crop_p=d.object_centered_crop_p, min_size=max(d.min_box_size, 1.0))


def load_split(cfg: Config, split: str) -> DetectionSet:
    src = getattr(cfg.data, split)
    kwargs: dict[str, Any] = {"strict": cfg.data.strict}
    if src.format == "coco":
        kwargs["images_dir"] = src.images
    else:
        if src.classes is not None:
            kwargs["classes"] = src.classes
        if src.format == "yolo":
            kwargs["split"] = src.split or split  # which key of a dataset.yaml
    return load_detection_set(src.format, src.path, **kwargs)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20


def load_teacher(tcfg: TeacherConfig, device: torch.device) -> Teacher:
    """The frozen teacher from a ``detdistill train`` checkpoint."""
    r = restore_model(tcfg.checkpoint, device)
    return Teacher(r.model, r.adapter, tcfg.input_scale, r.class_names)


def _autocast(cfg: Config, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    mode = cfg.train.amp
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return contextlib.nullcontext
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    if mode == "auto" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def train_one_step(model: nn.Module, adapter: DetectorAdapter, batch: Batch, step: int, *,
                   optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   distiller: Distiller | None = None, grad_clip: float | None = None,
                   autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                   scaler: torch.amp.GradScaler | None = None, info: DistInfo | None = None) -> dict[str, float]:
    """Forward, loss, backward, clip, optimizer and scheduler step; returns each loss term as a float.

    Raises :class:`NonFiniteLossError` (before touching the weights) when any term is NaN/inf.
    """
    info = info or DistInfo()
    model.train()
    with autocast():
        losses = distiller(model, batch, step) if distiller is not None else adapter.forward_train(model, batch)[0]
    total = sum(losses.values())
    values = {f"loss/{k}": float(v.detach()) for k, v in losses.items()}
    bad = {k[5:]: v for k, v in values.items() if not math.isfinite(v)}
    # Agreed across ranks: a rank that stopped alone would leave the others hanging in the
    # gradient all-reduce. Every rank then names the term and the rank it went bad on.
    if float(reduce_mean(torch.tensor(float(bool(bad))), info)) > 0:
        per_rank = gather_objects(bad, info)
        where = "; ".join((f"rank {r}: " if info.enabled else "") + ", ".join(f"{k}={v}" for k, v in b.items())
                          for r, b in enumerate(per_rank) if b)
        raise NonFiniteLossError(f"step {step}: non-finite loss term(s) {where}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if distiller is not None:
        all_reduce_grads(list(distiller.parameters()), info)  # connectors live outside DDP
    if grad_clip:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    values["loss"] = float(total.detach())
    values["lr"] = optimizer.param_groups[0]["lr"]
    return values


def _warn_stuck_terms(means: dict[str, float], history: dict[str, list[float]], warned: set[str], step: int,
                      say: Callable[[str], None], span: int = 5) -> None:
    """Warn once when a loss term has not moved at all over ``span`` logging windows.

    A term frozen to the last digit is a dead branch, not a plateau: e.g. FCOS's
    ``relu(bbox_reg)`` collapsing to zero boxes pins ``bbox_regression`` at exactly 1.0.
    """
    for key, value in means.items():
        if not key.startswith("loss/"):
            continue
        hist = history.setdefault(key, [])
        hist.append(value)
        del hist[:-span]
        if len(hist) == span and max(hist) - min(hist) < 1e-7 and key not in warned:
            warned.add(key)
            say(f"warning: step {step}: {key} has not changed over the last {span} log windows ({value:.6f}); "
                "a branch of the model may be dead (for FCOS box regression try model.reg_bias_init: 1.0)")


def _checkpoint_state(cfg: Config, model: nn.Module, distiller: Distiller | None, optimizer: torch.optim.Optimizer,
                      scheduler: Any, scaler: Any, step: int, dset: DetectionSet) -> dict[str, Any]:
    return {
        "model": unwrap(model).state_dict(),
        "distiller": distiller.state_dict() if distiller is not None else {},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": step,
        "rng": rng_state(),
        "config": cfg.to_yaml(),
        "class_names": list(dset.class_names),
        "category_ids": list(dset.category_ids),
        "detdistill_version": __version__,
    }


def train(cfg: Config, *, resume: bool | str = True, progress: bool = True, stop_after: int | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train (or distil into) ``cfg.model`` and evaluate it; returns the final metrics.

    Args:
        resume: ``True`` resumes from ``<run_dir>/checkpoints/last.pt`` when it exists, a path
            resumes from that checkpoint, ``False`` starts fresh.
        stop_after: stop (after checkpointing) once this many steps are done, as if
            interrupted; used to test resume.
    """
    device = resolve_device(cfg.train.device)
    info = init_distributed(device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    say = log if info.is_main else (lambda _m: None)
    seed_everything(cfg.seed)
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    train_set, val_set = load_split(cfg, "train"), load_split(cfg, "val")
    if train_set.class_names != val_set.class_names:
        raise ValueError(f"train and val class names differ: {train_set.class_names} vs {val_set.class_names}")
    say(train_set.summary())
    say(val_set.summary())

    adapter = get_adapter(cfg.model.framework)
    model = adapter.build(cfg.model, train_set.num_classes).to(device)
    distiller = None
    if cfg.distill:
        teacher = load_teacher(cfg.teacher, device) if cfg.teacher is not None else None
        if teacher is not None and teacher.class_names != train_set.class_names:
            say(f"note: teacher classes {teacher.class_names} differ from the data's {train_set.class_names}; "
                "feature KD still works, logit KD will refuse")
        distiller = Distiller(model, adapter, cfg.distill, teacher).to(device)
    params = list(model.parameters()) + (list(distiller.parameters()) if distiller is not None else [])
    optimizer = build_optimizer(cfg.train, params)
    scheduler = build_scheduler(cfg.train, optimizer)
    autocast = _autocast(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.train.amp == "fp16" else None

    start = 0
    ckpt_path = Path(resume) if isinstance(resume, (str, Path)) else ckpt_dir / "last.pt"
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        unwrap(model).load_state_dict(state["model"])
        if distiller is not None and state.get("distiller"):
            distiller.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start = int(state["step"])
        say(f"resumed from {ckpt_path} at step {start}")
    elif isinstance(resume, (str, Path)):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    ddp_model = wrap_ddp(model, info, device)
    logger = MetricsLogger(run_dir) if info.is_main else None

    d = cfg.data
    train_ds = TrainDataset(train_set, train_transform(d), cache_images=d.cache_images)
    if d.cache_images and d.workers > 0:
        train_ds.preload()  # decode once before workers fork, so they share the cache
    val_ds = EvalDataset(val_set, EvalTransform())
    sampler = StepBatchSampler(len(train_set), cfg.train.batch_size, cfg.seed, start_step=start,
                               world_size=info.world_size, rank=info.rank)
    # Own generator: iter(loader) draws a base seed, which must not advance the global torch RNG
    # (restored on resume; Faster R-CNN's box sampling draws from it), or resume is not exact.
    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=d.workers, collate_fn=collate,
                        persistent_workers=d.workers > 0, generator=torch.Generator().manual_seed(cfg.seed))

    def run_eval(step: int) -> EvalResult:
        result = evaluate(unwrap(model), adapter, val_ds, cfg.eval, device, info=info, progress=progress,
                          nms_thresh=cfg.model.nms_thresh)
        if logger is not None:
            logger.log(step, "eval", result.as_dict())
        say(f"step {step}: " + ", ".join(f"{k} {getattr(result, k):.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
        return result

    def write_ckpt(step: int) -> None:
        if info.is_main:
            save_checkpoint(ckpt_dir / "last.pt", _checkpoint_state(cfg, model, distiller, optimizer, scheduler, scaler, step, train_set))

    t0 = time.perf_counter()
    window: dict[str, list[float]] = {}
    stuck_history: dict[str, list[float]] = {}
    warned: set[str] = set()
    step_times: list[float] = []
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    bar = tqdm(total=cfg.train.steps, initial=start, desc=cfg.name, unit="step", disable=not (progress and info.is_main),
               dynamic_ncols=True)
    step = start
    final: EvalResult | None = None
    try:
        it = iter(loader)
        for step in range(start, end):
            batch = next(it).to(device)
            ts = time.perf_counter()
            values = train_one_step(ddp_model, adapter, batch, step, optimizer=optimizer, scheduler=scheduler,
                                    distiller=distiller, grad_clip=cfg.train.grad_clip, autocast=autocast,
                                    scaler=scaler, info=info)
            step_times.append(time.perf_counter() - ts)
            for k, v in values.items():
                window.setdefault(k, []).append(v)
            bar.update(1)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == end:
                means = {k: float(np.mean(v)) for k, v in window.items()}
                means["sec_per_step"] = float(np.mean(step_times[-len(window["loss"]):]))
                window.clear()
                bar.set_postfix(loss=f"{means['loss']:.3f}")
                _warn_stuck_terms(means, stuck_history, warned, done, say)
                if logger is not None:
                    logger.log(done, "train", means)
            if cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0 and done != end:
                write_ckpt(done)
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps:
                run_eval(done)
        step = end
        write_ckpt(end)
        if end == cfg.train.steps:
            final = run_eval(end)
            if info.is_main:
                (run_dir / "final_metrics.json").write_text(json.dumps(
                    {k: (v if math.isfinite(v) else None) for k, v in final.as_dict().items()}, indent=2))
                adapter.export(model, cfg.model, train_set.num_classes, run_dir / "export")
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{err}. Last good checkpoint: {ckpt_dir / 'last.pt'}") from None
    finally:
        bar.close()
        if distiller is not None:
            distiller.remove_hooks()
        if logger is not None:
            logger.close()
            with contextlib.suppress(Exception):
                plot_run(run_dir)
        cleanup(info)
    seconds = time.perf_counter() - t0
    result = TrainResult(run_dir, final, step, seconds, float(np.mean(step_times)) if step_times else 0.0,
                         peak_memory_mb(device))
    if info.is_main and final is not None:
        (run_dir / "run_summary.json").write_text(json.dumps(
            {"steps": result.steps, "seconds": seconds, "sec_per_step": result.sec_per_step,
             "peak_mem_mb": result.peak_mem_mb, "resumed_from": start, "device": str(device)}, indent=2))
    return result
