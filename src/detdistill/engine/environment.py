"""What a run's numbers depend on beyond its config: the torch build, the processor, the threads.

The same config and seed reproduce a run bit for bit only on the same software and hardware:
on CPU, the kernels torch picks (AVX2 or AVX-512, oneDNN or not) and the number of threads
change the order of floating-point sums, and 400 from-scratch steps amplify that into several
AP. Measured here: the FCOS-R18 student alone, seed 1, gave car AP 29.7 on one 2-core machine
and 35.2 on another, with the same torch 2.14.1 build and one thread. A paired bench verdict
compares runs *of one seed*; it means something only when both runs come from one environment,
so every run records :func:`run_environment` and the bench checks :func:`pairing_key`.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_environment", "pairing_key", "history_key", "extend_history", "PAIRING_FIELDS"]

# The fields that change a run's numbers; python and detdistill versions are recorded but do not
# enter the key (a detdistill change that alters training shows in its own tests and changelog).
PAIRING_FIELDS = ("torch", "torchvision", "device", "processor", "cpu_capability", "threads")


def _cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_environment(device: torch.device) -> dict[str, Any]:
    """The software and hardware a run trained on, as plain JSON values.

    ``device`` is the run's device; on CUDA the GPU's name is the ``processor``.
    """
    try:
        import torchvision

        tv = str(torchvision.__version__)
    except ImportError:  # a DETR- or YOLO-only install may lack it
        tv = "none"
    from .. import __version__

    cuda = device.type == "cuda"
    return {
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only checkpoints refuse
        "torchvision": tv,
        "device": device.type,
        "processor": torch.cuda.get_device_name(device) if cuda else _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "detdistill": __version__,
    }


def pairing_key(env: dict[str, Any] | None) -> str:
    """One string naming the environment's numerics-relevant fields; ``"unrecorded"`` for a run
    written before runs recorded their environment."""
    if not env:
        return "unrecorded"
    return ", ".join(f"{k} {env.get(k, '?')}" for k in PAIRING_FIELDS)


def extend_history(history: list[dict[str, Any]], current: dict[str, Any]) -> list[dict[str, Any]]:
    """The environments a run has trained in, oldest first, with ``current`` appended when it
    differs (by :func:`pairing_key`) from the last one. A run resumed on the machine it started on
    keeps a one-entry history; one resumed elsewhere gets two."""
    if history and pairing_key(history[-1]) == pairing_key(current):
        return list(history)
    return [*history, current]


def history_key(history: list[dict[str, Any]] | None, final: dict[str, Any] | None = None) -> str:
    """The pairing key of a whole run: its one environment's key, or ``"mixed: A, then B"`` when it
    was resumed in another environment (such a run pairs with no single-environment run).
    ``final`` stands in for a run written before runs kept a history."""
    keys = list(dict.fromkeys(pairing_key(env) for env in (history or [final])))
    return keys[0] if len(keys) == 1 else "mixed: " + ", then ".join(keys)
