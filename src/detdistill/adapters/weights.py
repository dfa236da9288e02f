"""Loading model weights from local files only, without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors``, a plain ``state_dict`` file, or a detdistill checkpoint.

    ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``, which refuses
    arbitrary pickled objects. A detdistill training checkpoint stores the model under
    ``"model"``; a ``module.`` prefix left by DDP is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (weights load from local files only; nothing is downloaded)")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"cannot read weights from {path}: {err}") from err
        state = obj.get("model", obj) if isinstance(obj, dict) else obj
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load ``path`` into ``model``, naming missing, unexpected and mis-shaped keys on failure."""
    state = read_state_dict(path)
    own = model.state_dict()
    bad_shape = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if bad_shape or (strict and (missing or unexpected)):
        parts = [f"weights {path} do not fit the model:"]
        if bad_shape:
            parts.append("  shape mismatch: " + "; ".join(bad_shape[:10]))
        if strict and missing:
            parts.append(f"  missing in file ({len(missing)}): {', '.join(missing[:10])}")
        if strict and unexpected:
            parts.append(f"  not in model ({len(unexpected)}): {', '.join(unexpected[:10])}")
        raise ValueError("\n".join(parts))
    model.load_state_dict(state, strict=strict)
