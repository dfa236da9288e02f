"""Taps: named layers of a detector whose outputs KD methods read (cf. timm ``feature_info``).

Everything about taps lives here, below the adapters and the Distiller:

- :class:`TapInfo`: what a tap is (module path, output key, channels, stride, kind);
- :func:`probe_tap_shapes`: one dry forward that measures channels, stride and kind;
- :func:`resolve_taps`: requested names -> :class:`TapInfo`, with errors that list the valid names;
- :class:`FeatureTaps`: removable forward hooks that record the outputs, cleared every step.

A tap is either a *map* ``(N, C, H, W)`` (FPN levels, backbone stages) or a *token sequence*
``(N, L, D)`` (transformer encoder/decoder states). Its channels (``C`` or ``D``) must be
known before training: a tap that the probe cannot measure is an error naming it, never a
silent 0 that would size a connector wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from .modules import eval_mode, unwrap

TapKind = Literal["map", "tokens"]


@dataclass(frozen=True)
class TapInfo:
    """Metadata of a tappable layer, so connectors can size themselves.

    Attributes:
        name: the public tap name (``"neck.p3"``) or a raw module path (``"backbone.body.layer2"``).
        module: dotted path of the hooked module inside the *unwrapped* model.
        key: for modules returning a dict/tuple, which entry of the output this tap selects
            (``None``: the output itself).
        channels: ``C`` of a map or ``D`` of a token sequence; ``0`` until probed.
        stride: input pixels per map pixel (``0`` for token sequences or when unknown).
        kind: ``"map"`` for ``(N, C, H, W)`` outputs, ``"tokens"`` for ``(N, L, D)`` outputs.
    """

    name: str
    module: str
    key: str | int | None = None
    channels: int = 0
    stride: int = 0
    kind: TapKind = "map"


class TapError(KeyError):
    """A tap name does not exist or cannot be measured; the message names it (and the valid ones)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class _ForwardFeatures(Protocol):
    def forward_features(self, model: nn.Module, images: list[Tensor], *, need_head: bool) -> Any: ...


def _measure(t: Any, size: int) -> tuple[int, int, TapKind] | None:
    if isinstance(t, Tensor) and t.dim() == 4:
        return int(t.shape[1]), size // int(t.shape[-1]), "map"
    if isinstance(t, Tensor) and t.dim() == 3:
        return int(t.shape[-1]), 0, "tokens"
    return None


@torch.no_grad()
def probe_tap_shapes(adapter: _ForwardFeatures, model: nn.Module, taps: dict[str, tuple[str, str | int | None]],
                     size: int = 256) -> dict[str, tuple[int, int, TapKind]]:
    """``{name: (channels, stride, kind)}`` of each ``(module path, output key)`` from one dry forward.

    Runs ``adapter.forward_features`` (no head) on a blank ``size`` x ``size`` image in eval
    mode. Taps that the pass does not reach, or whose output is neither a map nor a token
    sequence, are left out of the result.
    """
    bare = unwrap(model)
    found: dict[str, tuple[int, int, TapKind]] = {}
    handles = []
    for name, (module, key) in taps.items():
        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name, key: str | int | None = key) -> None:
            shape = _measure(out[key] if key is not None else out, size)
            if shape is not None:
                found[name] = shape
        handles.append(bare.get_submodule(module).register_forward_hook(hook))
    try:
        with eval_mode(bare):
            param = next(bare.parameters(), None)
            adapter.forward_features(bare, [torch.zeros(3, size, size, device=param.device if param is not None else None)],
                                     need_head=False)
    finally:
        for h in handles:
            h.remove()
    return found


def resolve_taps(adapter: _ForwardFeatures, model: nn.Module, available: dict[str, TapInfo], names: list[str], *,
                 role: str = "model") -> dict[str, TapInfo]:
    """Map each requested name to a measured :class:`TapInfo`.

    A name is either one of the adapter's named taps (``neck.p3``) or a raw module path of
    the unwrapped model (``backbone.body.layer3``), measured by a dry forward. Anything else
    raises :class:`TapError` listing the named taps, so a typo never becomes a silently-zero
    loss; so does a layer whose output is not a map or token sequence, or that the
    feature pass never reaches.
    """
    bare = unwrap(model)
    out: dict[str, TapInfo] = {}
    raw: dict[str, tuple[str, None]] = {}
    for name in names:
        if name.startswith("module."):
            raise TapError(f"{role} tap {name!r}: drop the DDP 'module.' prefix; taps are resolved on the unwrapped model")
        if name in available:
            out[name] = available[name]
            continue
        try:
            bare.get_submodule(name)
        except AttributeError:
            raise TapError(
                f"{role} has no tap {name!r}. Named taps: {', '.join(available) or '(none)'}; "
                f"any module path also works (see `detdistill list --model ...`)"
            ) from None
        raw[name] = (name, None)
    if raw:
        shapes = probe_tap_shapes(adapter, bare, raw)
        for name in raw:
            out[name] = TapInfo(name, name, None, *shapes[name]) if name in shapes else TapInfo(name, name)
    for name, info in out.items():
        if info.channels <= 0:
            raise TapError(f"{role} tap {name!r} (module {info.module!r}): cannot tell its channels; the feature pass "
                           "does not reach it or its output is not an (N, C, H, W) map or (N, L, D) sequence. "
                           "Tap a feature-map layer (see `detdistill list --model ...`)")
    return out


class FeatureTaps:
    """Records the outputs of the given taps during each forward pass.

    Hooks are registered on the *unwrapped* model, so they fire identically whether the
    forward goes through DistributedDataParallel or not. ``records[name]`` holds one entry
    per call of the module (heads call their conv towers once per level). Use as a
    context manager, or call :meth:`remove`; :meth:`clear` drops tensors between steps.
    While ``enabled`` is False the hooks record nothing (the Distiller keeps its hooks
    attached between steps, and evaluation forwards of the student must not pile up).
    """

    def __init__(self, model: nn.Module, taps: dict[str, TapInfo]) -> None:
        self.taps = taps
        self.records: dict[str, list[Tensor]] = {name: [] for name in taps}
        self._handles: list[Any] = []
        self.enabled = True
        bare = unwrap(model)
        by_module: dict[str, list[TapInfo]] = {}
        for info in taps.values():
            by_module.setdefault(info.module, []).append(info)
        for module_path, infos in by_module.items():
            self._handles.append(bare.get_submodule(module_path).register_forward_hook(self._make_hook(infos)))

    def _make_hook(self, infos: list[TapInfo]) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not self.enabled:
                return
            for info in infos:
                value = output if info.key is None else output[info.key]
                self.records[info.name].append(value)

        return hook

    def get(self, name: str) -> Tensor:
        """The tap's output from the last forward (its only call)."""
        recs = self.records[name]
        if not recs:
            raise RuntimeError(f"tap {name!r} recorded nothing: the forward pass did not reach module {self.taps[name].module!r}")
        if len(recs) > 1:
            raise RuntimeError(f"tap {name!r} fired {len(recs)} times in one forward; use records[{name!r}] for per-call outputs")
        return recs[0]

    def clear(self) -> None:
        for recs in self.records.values():
            recs.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
