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


def restore_model(path: str | Path, device: torch.device | str = "cpu") -> RestoredModel:
    """The model of checkpoint ``path`` in eval mode, built by its own adapter and config."""
    ckpt = load_checkpoint(path)
    for key in ("config", "model", "class_names"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} lacks {key!r}: it was not written by `detdistill train`")
    cfg = config_from_dict(yaml.safe_load(ckpt["config"]), source=f"{path}:config")
    adapter = get_adapter(cfg.model.framework)
    names = list(ckpt["class_names"])
    model = adapter.build(cfg.model.model_copy(update={"weights": None}), len(names))
    model.load_state_dict(ckpt["model"], strict=True)
    model.to(device).eval()
    ids = list(ckpt.get("category_ids") or range(len(names)))
    return RestoredModel(model, adapter, cfg, names, ids, int(ckpt.get("step", 0)))
