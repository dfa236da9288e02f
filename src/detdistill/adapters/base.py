"""The adapter seam: what every detector framework must answer.

Nothing outside ``adapters/<framework>.py`` knows a framework's contract:
torchvision's ``model(images, targets)`` loss dict, DETR's normalised cxcywh
labels, or ultralytics' separate loss object. The engine and the distiller
talk to models only through a :class:`DetectorAdapter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
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


@torch.no_grad()
def probe_tap_shapes(adapter: DetectorAdapter, model: nn.Module, taps: dict[str, tuple[str, str | int | None]],
                     size: int = 256) -> dict[str, tuple[int, int]]:
    """``{name: (channels, stride)}`` of each ``(module path, output key)`` from one dry forward.

    Runs ``adapter.forward_features`` (no head) on a blank ``size``x``size`` image in eval
    mode; a tap that pass does not reach, or whose output is not an ``(N, C, H, W)`` map,
    gets ``(0, 0)``. Every adapter and the Distiller size their taps with this one probe.
    """
    bare = unwrap(model)
    found: dict[str, tuple[int, int]] = {}
    handles = []
    for name, (module, key) in taps.items():
        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name, key: str | int | None = key) -> None:
            t = out[key] if key is not None else out
            found[name] = (int(t.shape[1]), size // int(t.shape[-1])) if isinstance(t, Tensor) and t.dim() == 4 else (0, 0)
        handles.append(bare.get_submodule(module).register_forward_hook(hook))
    was_training = bare.training
    bare.eval()
    try:
        param = next(bare.parameters(), None)
        adapter.forward_features(bare, [torch.zeros(3, size, size, device=param.device if param is not None else None)],
                                 need_head=False)
    finally:
        bare.train(was_training)
        for h in handles:
            h.remove()
    return {name: found.get(name, (0, 0)) for name in taps}
