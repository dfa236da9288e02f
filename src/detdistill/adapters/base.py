"""The adapter seam: what every detector framework must answer.

Nothing outside ``adapters/<framework>.py`` knows a framework's contract:
torchvision's ``model(images, targets)`` loss dict, DETR's normalised cxcywh
labels, or ultralytics' separate loss object. The engine and the distiller
talk to models only through a :class:`DetectorAdapter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from torch import Tensor, nn

from ..registry import Registry
from ..structures import Batch, Detections, RawOutputs, TapInfo

if TYPE_CHECKING:
    from ..config import ModelConfig


@runtime_checkable
class DetectorAdapter(Protocol):
    """One framework's detectors behind a framework-neutral interface."""

    name: str

    def build(self, cfg: "ModelConfig", num_classes: int) -> nn.Module:
        """The model, randomly initialised or from ``cfg.weights`` (a local file; never a download)."""
        ...

    def archs(self) -> list[str]:
        """Architecture names ``build`` accepts."""
        ...

    def taps(self, model: nn.Module) -> dict[str, TapInfo]:
        """Tappable layers of ``model`` (unwrapped), with channels and stride."""
        ...

    def forward_train(self, model: nn.Module, batch: Batch, *, need_raw: bool = False) -> tuple[dict[str, Tensor], RawOutputs]:
        """Task-loss terms and, when ``need_raw``, the head's raw outputs.

        ``model`` may be wrapped in DistributedDataParallel: the call goes through
        the wrapper so gradients are synchronised.
        """
        ...

    def forward_features(self, model: nn.Module, images: list[Tensor], *, need_head: bool) -> RawOutputs:
        """Teacher-side forward in inference mode, stopping after the neck unless ``need_head``.

        Taps registered on ``model`` record as usual; the return carries raw head
        outputs when ``need_head``.
        """
        ...

    def predict(self, model: nn.Module, images: list[Tensor]) -> list[Detections]:
        """Detections per image, in each image's pixel frame (eval mode, no grad)."""
        ...

    def export(self, model: nn.Module, cfg: "ModelConfig", num_classes: int, out_dir: Path) -> Path:
        """Write a checkpoint that loads in the plain framework without detdistill; return its path."""
        ...


ADAPTERS: Registry[DetectorAdapter] = Registry("detector framework")


def get_adapter(framework: str) -> DetectorAdapter:
    """The adapter for ``framework`` (e.g. ``"torchvision"``), importing optional ones lazily."""
    if framework not in ADAPTERS:
        # Adapters with optional dependencies register on import; import them on demand.
        import importlib

        module = {"torchvision": "torchvision", "ultralytics": "ultralytics", "transformers": "transformers"}.get(framework)
        if module is not None:
            try:
                importlib.import_module(f"{__package__}.{module}")
            except ImportError as err:
                raise ImportError(f"detector framework {framework!r} needs an optional dependency: {err}") from err
    return ADAPTERS.get(framework)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel wrappers.

    Every layer lookup goes through this, so tap names never carry a ``module.``
    prefix (the classic silent-zero-KD-loss bug under DDP).
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
