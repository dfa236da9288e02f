"""The adapter seam: what every detector framework must answer.

Nothing outside ``adapters/<framework>.py`` knows a framework's contract:
torchvision's ``model(images, targets)`` loss dict, DETR's normalised cxcywh
labels, or ultralytics' separate loss object. The engine and the distiller
talk to models only through a :class:`DetectorAdapter`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..modules import eval_mode, unwrap
from ..registry import Registry
from ..structures import Batch, Detections, RawOutputs
from ..taps import TapInfo

__all__ = ["ADAPTERS", "DetectorAdapter", "get_adapter", "unwrap", "no_extra_inputs", "no_options", "probe_raw_outputs"]

if TYPE_CHECKING:
    from ..config import ModelConfig


@runtime_checkable
class DetectorAdapter(Protocol):
    """One framework's detectors behind a framework-neutral interface.

    A training step runs ``forward_train``; KD methods that need the student's head on
    other features (ScaleKD's assistant) run ``head`` then ``head_loss``, which together
    compute exactly what ``forward_train`` computes on the model's own features.
    """

    name: str

    def build(self, cfg: "ModelConfig", num_classes: int) -> nn.Module:
        """The model, randomly initialised or from ``cfg.weights`` (a local file; never a download)."""
        ...

    def archs(self) -> list[str]:
        """Architecture names ``build`` accepts."""
        ...

    def taps(self, model: nn.Module) -> dict[str, TapInfo]:
        """Tappable layers of ``model`` (unwrapped), with channels, stride and kind."""
        ...

    def forward_train(self, model: nn.Module, batch: Batch, *, need_raw: bool = False,
                      extra_inputs: Mapping[str, Any] | None = None) -> tuple[dict[str, Tensor], RawOutputs]:
        """Task-loss terms and the raw outputs.

        The raw outputs always carry the geometry (``input_size``, ``image_sizes``); the
        head's outputs (logits, boxes, features) only when ``need_raw`` (two-stage models:
        the maps only, they have no dense class logits). ``extra_inputs``
        are framework-specific training-only inputs (e.g. an extra query group of a DETR);
        an adapter that takes none raises on them. ``model`` may be wrapped in
        DistributedDataParallel: the call goes through the wrapper so gradients sync.
        """
        ...

    def forward_features(self, model: nn.Module, images: list[Tensor], *, need_head: bool) -> RawOutputs:
        """Teacher-side forward in inference mode, stopping after the neck unless ``need_head``.

        Taps registered on ``model`` record as usual; the return carries raw head
        outputs when ``need_head``.
        """
        ...

    def backbone_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The backbone's parameters (without the neck and head), e.g. to hold them still early in training."""
        ...

    def head(self, model: nn.Module, features: list[Tensor], raw: RawOutputs, batch: Batch | None = None) -> RawOutputs:
        """The model's own detection head on ``features`` (one map per level, the shapes of the
        model's neck outputs); ``raw`` supplies the geometry (``input_size``, ``image_sizes``).
        Two-stage heads sample their regions against ``batch``'s targets, as in training."""
        ...

    def head_loss(self, model: nn.Module, raw: RawOutputs, batch: Batch) -> dict[str, Tensor]:
        """The task loss of head outputs from :meth:`head` against ``batch``'s targets."""
        ...

    def predict(self, model: nn.Module, images: list[Tensor]) -> list[Detections]:
        """Detections per image, in each image's pixel frame (eval mode, no grad)."""
        ...

    def export_onnx(self, model: nn.Module, out_path: Path, *, opset: int = 17) -> Path:
        """Write an ONNX graph of the model in inference mode (``onnx`` extra); return its path.
        What goes in and out is the adapter's to document (see ``docs/export.md``)."""
        ...

    def export(self, model: nn.Module, cfg: "ModelConfig", num_classes: int, out_dir: Path, *,
               class_names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None) -> Path:
        """Write a checkpoint that loads in the plain framework without detdistill; return its path.
        ``model.json`` names the classes (label k -> ``class_names[k]``, ``category_ids[k]``)."""
        ...


ADAPTERS: Registry[DetectorAdapter] = Registry("detector framework")


def get_adapter(framework: str) -> DetectorAdapter:
    """The adapter for ``framework`` (e.g. ``"torchvision"``).

    Adapters register where they are defined, in ``adapters/<framework>.py``; one whose
    optional dependency is not installed is imported (and so registered) on first use.
    """
    if framework not in ADAPTERS and framework.isidentifier():
        import importlib
        import importlib.util

        module = f"{__package__}.{framework}"
        if importlib.util.find_spec(module) is not None:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ImportError(f"detector framework {framework!r} needs an optional dependency: {err}") from err
    return ADAPTERS.get(framework)


def no_extra_inputs(adapter: str, extra_inputs: Mapping[str, Any] | None) -> None:
    """Refuse training-only extra inputs in an adapter whose models take none."""
    if extra_inputs:
        raise ValueError(f"the {adapter} adapter's models take no extra training inputs; got {sorted(extra_inputs)}")


def no_options(adapter: str, cfg: "ModelConfig") -> None:
    """Refuse ``model.options`` in an adapter whose models are fully described by the generic keys."""
    if cfg.options:
        raise ValueError(f"model.options {sorted(cfg.options)}: the {adapter} adapter takes no options "
                         "(model.options holds framework-specific settings, e.g. of transformers DETRs)")


@torch.no_grad()
def probe_raw_outputs(adapter: DetectorAdapter, model: nn.Module, size: int = 256) -> RawOutputs:
    """``model``'s raw head outputs on one blank ``size`` x ``size`` image, in eval mode: what a
    method checks at build time (logit layouts, whether a side is a DETR) before any data loads."""
    bare = unwrap(model)
    with eval_mode(bare):
        param = next(bare.parameters())
        return adapter.forward_features(bare, [torch.zeros(3, size, size, device=param.device)], need_head=True)
