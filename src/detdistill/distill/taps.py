"""Forward hooks that record named layers of a model, removable and cleared every step."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..adapters.base import unwrap
from ..structures import TapInfo


class TapError(KeyError):
    """A tap name does not exist; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def resolve_taps(model: nn.Module, available: dict[str, TapInfo], names: list[str], *, role: str = "model") -> dict[str, TapInfo]:
    """Map each requested name to a :class:`TapInfo`.

    A name is either one of the adapter's named taps (``neck.p3``) or a raw module path
    of the unwrapped model (``backbone.body.layer3``). Anything else raises, listing
    the named taps, so a typo never becomes a silently-zero loss.
    """
    bare = unwrap(model)
    out: dict[str, TapInfo] = {}
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
        out[name] = TapInfo(name, name, None, 0, 0)
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
