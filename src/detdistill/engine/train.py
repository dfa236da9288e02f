"""The training loop, as plain functions: ``train`` drives ``train_one_step`` and ``evaluate``.

One code path serves plain training and distillation: without KD terms the step loss
is the adapter's task loss; with them a :class:`~detdistill.distill.Distiller` adds the
weighted KD terms. Works in one process or under ``torchrun`` (DDP).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..adapters.base import DetectorAdapter
from ..config import Config
from ..data.sample import DetectionSet
from ..distill.distiller import Distiller
from ..modules import unwrap
from ..report.metrics_log import MetricsLogger
from ..report.plots import plot_run
from ..report.progress import live_bar, plain_progress_line
from ..structures import Batch
from .checkpoint import rng_state, save_checkpoint
from .coco_eval import EvalResult
from .device import peak_memory_mb
from .environment import extend_history, run_environment
from .distributed import (DistInfo, all_reduce_grads, broadcast_buffers, cleanup, gather_objects, mean_over_ranks,
                          reduce_mean)
from .evaluate import evaluate
from .setup import build_run


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
        for p in distiller.frozen_parameters(step):  # e.g. ScaleKD's early backbone freeze
            p.grad = None  # the optimizer skips it: no update, no decay, no momentum
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
    if distiller is not None:
        values.update(distiller.last_diagnostics)
    return values


def _warn_stuck_terms(means: dict[str, float], history: dict[str, list[float]], warned: set[str], step: int,
                      say: Callable[[str], None], span: int = 5, started: set[str] | None = None,
                      rel_tol: float = 1e-3) -> None:
    """Warn once when a loss term has not moved over ``span`` logging windows: its window means
    stay within ``rel_tol`` (0.1 %) of their size.

    A live term's window mean moves by a few per cent from batch to batch; one that stays within
    0.1 % for 50 steps is a dead branch, not a plateau: e.g. FCOS's ``relu(bbox_reg)`` collapsing to
    zero-size boxes pins ``bbox_regression`` near 1.0 (1.0003, 1.0001, 1.0002, 0.9999, ...: not
    exactly 1, so an exact-equality test missed it on every aerial-cars student). A term at exactly 0 has not
    started yet (a weight warm-up, ScaleKD's ``csa_start``): it is left to
    :func:`_warn_never_started` at the end of the run.
    """
    for key, value in means.items():
        if not key.startswith("loss/"):
            continue
        hist = history.setdefault(key, [])
        hist.append(value)
        del hist[:-span]
        if value != 0.0 and started is not None:
            started.add(key)
        size = max(map(abs, hist))
        if len(hist) == span and size > 0 and max(hist) - min(hist) <= rel_tol * size and key not in warned:
            warned.add(key)
            say(f"warning: step {step}: {key} has not changed over the last {span} log windows ({value:.6f}); "
                "a branch of the model may be dead (for FCOS box regression: model.reg_bias_init: 1.0)")


def _warn_runaway_terms(means: dict[str, float], warned: set[str], step: int, say: Callable[[str], None],
                        ratio: float = 100.0) -> None:
    """Warn once per term when a KD term's window mean exceeds ``ratio`` x the detection loss.

    A term that large is diverging, not teaching: e.g. a ``normalize: true`` factor of ~10^3 on a
    term whose own modules train by SGD (ScaleKD's SDF branches) multiplies their step size by it.
    Under ``train.grad_clip`` the runaway gradient also scales the student's detection gradients
    down to nothing, so the detection loss stalls while the run looks alive.
    """
    task = sum(v for k, v in means.items() if k.startswith("loss/") and not k.startswith("loss/kd/"))
    for key, value in means.items():
        if key.startswith("loss/kd/") and task > 0 and abs(value) > ratio * task and key + ":runaway" not in warned:
            warned.add(key + ":runaway")
            say(f"warning: step {step}: {key} is {value:.3g}, {abs(value) / task:.0f}x the detection loss ({task:.3g}): "
                "the term is diverging and drowns the task's gradients (under grad_clip too). Lower its weight, "
                "drop `normalize`, or add `warmup_steps`")


def _warn_never_started(history: dict[str, list[float]], started: set[str], say: Callable[[str], None]) -> None:
    """Warn about every loss term that was exactly 0 in every logging window of the run: it never
    reached the loss (a start step past ``train.steps``, or features that never arrived)."""
    for key in history:
        if key not in started:
            say(f"warning: {key} was exactly 0 for the whole run: it never contributed to training "
                "(check the term's start step or warm-up against train.steps, and its feature pairs)")


def _checkpoint_state(cfg: Config, model: nn.Module, distiller: Distiller | None, optimizer: torch.optim.Optimizer,
                      scheduler: Any, scaler: Any, step: int, dset: DetectionSet, ema: nn.Module | None = None,
                      environments: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "model": unwrap(model).state_dict(),
        "ema": ema.state_dict() if ema is not None else {},  # AveragedModel: module.* weights + n_averaged
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
        "environment_history": list(environments or []),  # where it trained so far: a resume elsewhere is flagged
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
    run = build_run(cfg, resume=resume, log=log)
    info, say, model, distiller, start = run.info, run.say, run.model, run.distiller, run.start
    adapter, optimizer, scheduler, scaler = run.adapter, run.optimizer, run.scheduler, run.scaler
    run_dir, ckpt_dir, train_set = run.run_dir, run.ckpt_dir, run.train_set
    logger = MetricsLogger(run_dir, resume_step=start, final_step=cfg.train.steps) if info.is_main else None

    def run_eval(step: int) -> EvalResult:
        result = evaluate(run.eval_model, adapter, run.val_ds, cfg.eval, run.device, info=info, progress=progress,
                          nms_thresh=cfg.model.nms_thresh)
        if logger is not None:
            logger.log(step, "eval", result.as_dict())
        say(f"step {step}: " + ", ".join(f"{k} {getattr(result, k):.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
        return result

    def write_ckpt(step: int) -> None:
        if info.is_main:
            save_checkpoint(ckpt_dir / "last.pt", _checkpoint_state(cfg, model, distiller, optimizer, scheduler, scaler, step,
                                                                    train_set, run.ema, run.environments))

    t0 = time.perf_counter()
    window: dict[str, list[float]] = {}
    stuck_history: dict[str, list[float]] = {}
    warned: set[str] = set()
    started_terms: set[str] = set()  # loss terms seen non-zero: the rest have not started (or never reach the loss)
    step_times: list[float] = []
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    bar = tqdm(total=cfg.train.steps, initial=start, desc=cfg.name, unit="step", disable=not (live_bar(progress) and info.is_main),
               dynamic_ncols=True)
    step = start
    final: EvalResult | None = None
    try:
        it = iter(run.loader)
        for step in range(start, end):
            batch = next(it).to(run.device)
            ts = time.perf_counter()
            values = train_one_step(run.ddp_model, adapter, batch, step, optimizer=optimizer, scheduler=scheduler,
                                    distiller=distiller, grad_clip=cfg.train.grad_clip, autocast=run.autocast,
                                    scaler=scaler, info=info)
            broadcast_buffers(model, info)  # rank 0's BatchNorm statistics everywhere, as DDP's next forward would
            if run.ema is not None:
                run.ema.update_parameters(model)  # every rank holds the same weights, so the same average
            step_times.append(time.perf_counter() - ts)
            for k, v in values.items():
                window.setdefault(k, []).append(v)
            bar.update(1)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == end:
                means = {k: float(np.mean(v)) for k, v in window.items()}
                means["sec_per_step"] = float(np.mean(step_times[-len(window["loss"]):]))
                means = mean_over_ranks(means, info)  # each rank saw its own share of the global batch
                window.clear()
                bar.set_postfix(loss=f"{means['loss']:.3f}")
                if progress and not live_bar(progress):  # a log file: one plain line per logging window
                    say(plain_progress_line(cfg.name, done, cfg.train.steps, means["loss"], means["sec_per_step"]))
                _warn_stuck_terms(means, stuck_history, warned, done, say, started=started_terms)
                _warn_runaway_terms(means, warned, done, say)
                if logger is not None:
                    logger.log(done, "train", means)
            if cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0 and done != end:
                write_ckpt(done)
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps:
                run_eval(done)
        step = end
        if end == cfg.train.steps and start == 0:  # a resumed run saw only part of the terms' history
            _warn_never_started(stuck_history, started_terms, say)
        write_ckpt(end)
        if end == cfg.train.steps:
            final = run_eval(end)
            if info.is_main:
                (run_dir / "final_metrics.json").write_text(json.dumps(
                    {k: (v if math.isfinite(v) else None) for k, v in final.as_dict().items()}, indent=2))
                adapter.export(run.eval_model, cfg.model, train_set.num_classes, run_dir / "export",
                               class_names=train_set.class_names, category_ids=train_set.category_ids)
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
                         peak_memory_mb(run.device))
    recorded = _recorded_summary(run_dir) if start == cfg.train.steps else None
    if recorded is not None:
        # A finished run scored again (a rerun quickstart, `train` on a done run): no step ran now, so
        # its time per step and memory are the training's, as recorded; the summary is kept as is.
        return TrainResult(run_dir, final, step, recorded["seconds"], recorded["sec_per_step"], recorded["peak_mem_mb"])
    if info.is_main and final is not None:
        (run_dir / "run_summary.json").write_text(json.dumps(
            {"steps": result.steps, "seconds": seconds, "sec_per_step": result.sec_per_step,
             "peak_mem_mb": result.peak_mem_mb, "resumed_from": start, "device": str(run.device),
             "environment": (here := run_environment(run.device)),
             "environment_history": extend_history(run.environments, here)}, indent=2))
    return result


def _recorded_summary(run_dir: Path) -> dict[str, float] | None:
    """The timing a finished run recorded in ``run_summary.json``, or None when it has none."""
    try:
        summary = json.loads((run_dir / "run_summary.json").read_text())
        return {k: float(summary[k]) for k in ("seconds", "sec_per_step", "peak_mem_mb")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
