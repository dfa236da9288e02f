"""Rebuild a trained model from a ``detdistill train`` checkpoint (its config travels inside)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from ..adapters.base import DetectorAdapter, get_adapter
from ..config import Config, config_from_dict
from .checkpoint import load_checkpoint


@dataclass
class RestoredModel:
    model: nn.Module
    adapter: DetectorAdapter
    config: Config
    class_names: list[str]
    category_ids: list[int]
    step: int
    weights: str = "raw"  # which weights were loaded: "ema" or "raw" (a run without EMA gives "raw")


def ema_weights(ckpt: dict) -> dict | None:
    """The EMA model's state dict inside a checkpoint, or ``None`` when it kept no EMA."""
    ema = ckpt.get("ema") or {}
    state = {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}
    return state or None


def restore_model(path: str | Path, device: torch.device | str = "cpu", *, weights: str = "ema") -> RestoredModel:
    """The model of checkpoint ``path`` in eval mode, built by its own adapter and config.

    ``weights="ema"`` (default) gives the EMA weights when the run kept them (what its
    evaluation and export used), else the weights; ``"raw"`` always the optimizer's weights.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    ckpt = load_checkpoint(path)
    for key in ("config", "model", "class_names"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} lacks {key!r}: it was not written by `detdistill train`")
    cfg = config_from_dict(yaml.safe_load(ckpt["config"]), source=f"{path}:config")
    adapter = get_adapter(cfg.model.framework)
    names = list(ckpt["class_names"])
    model = adapter.build(cfg.model.model_copy(update={"weights": None}), len(names))
    state = ema_weights(ckpt) if weights == "ema" else None
    model.load_state_dict(state if state is not None else ckpt["model"], strict=True)
    model.to(device).eval()
    ids = list(ckpt.get("category_ids") or range(len(names)))
    return RestoredModel(model, adapter, cfg, names, ids, int(ckpt.get("step", 0)),
                         "ema" if state is not None else "raw")
