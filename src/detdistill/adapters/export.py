"""The one export skeleton every adapter uses: weights, spec and a standalone loader.

An exported student is a folder that loads without detdistill:

- ``model.safetensors``: the bare model's state dict (no pickle, no code);
- ``model.json``: the spec its loader rebuilds the architecture from;
- ``load_model.py``: a copy of a real module of this package that depends only on the
  framework (e.g. :mod:`detdistill.models.torchvision_detectors`), so the exported loader
  is the same code that is linted and tested here;
- companion modules the loader imports from beside itself (e.g. ``pafpn.py``).
"""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn


def write_export(model: nn.Module, out_dir: str | Path, spec: dict[str, Any], loader: ModuleType,
                 companions: Sequence[ModuleType] = (), *, class_names: Sequence[str] | None = None,
                 category_ids: Sequence[int] | None = None) -> Path:
    """Write ``model`` (bare, not DDP-wrapped) with ``spec`` and the ``loader`` module; return the weights path.

    ``model.json`` also names the classes: label ``k`` of the model is ``class_names[k]``, and
    ``category_ids[k]`` is its id in the original annotations (COCO ids; ``k`` for YOLO/VOC).
    """
    n = int(spec["num_classes"])
    names = list(class_names) if class_names is not None else [str(k) for k in range(n)]
    ids = list(category_ids) if category_ids is not None else list(range(n))
    if len(names) != n or len(ids) != n:
        raise ValueError(f"export: {len(names)} class names / {len(ids)} category ids for a {n}-class model")
    spec = {**spec, "class_names": names, "category_ids": ids}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = out_dir / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt", "framework": str(spec.get("framework")),
                                             "arch": str(spec.get("arch"))})
    (out_dir / "model.json").write_text(json.dumps(spec, indent=2))
    shutil.copyfile(_source(loader), out_dir / "load_model.py")
    for module in companions:
        src = _source(module)
        shutil.copyfile(src, out_dir / src.name)
    return weights


def onnx_export(module: nn.Module, example: Tensor, out_path: str | Path, *, input_names: list[str],
                output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int = 17) -> Path:
    """``torch.onnx.export`` with TorchScript tracing (the exporter torchvision's detection models
    support), warnings about traced control flow silenced; a clear error without ``onnx``."""
    import warnings

    import torch

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError as err:
        raise ImportError("ONNX export needs the onnx extra: pip install 'detdistill[onnx]'") from err
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings on shape-dependent Python code, expected here
        torch.onnx.export(module, (example,), str(out_path), dynamo=False, opset_version=opset,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    return out_path


def _source(module: ModuleType) -> Path:
    path = inspect.getsourcefile(module)
    if path is None:
        raise RuntimeError(f"cannot find the source file of {module.__name__} to ship with the export")
    return Path(path)
