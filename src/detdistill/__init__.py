"""detdistill: knowledge distillation for object detectors.

Short API (the CLI is a thin layer over it)::

    import detdistill as dd
    cfg = dd.load_config("configs/aerial_student_fcos_r18_pkd.yaml", ["train.steps=200"])
    result = dd.train(cfg)             # distils when the config has `teacher` + `distill`
    print(result.final.AP, result.run_dir)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load_config", "config_from_dict", "train", "restore_model", "get_adapter", "METHODS", "__version__"]

if TYPE_CHECKING:
    from .adapters.base import get_adapter
    from .config import config_from_dict, load_config
    from .distill.methods import METHODS
    from .engine.restore import restore_model
    from .engine.train import train


def __getattr__(name: str) -> Any:
    # Lazy: `import detdistill` stays cheap (no torch import until something is used).
    if name in ("load_config", "config_from_dict"):
        from . import config
        return getattr(config, name)
    if name == "train":
        from .engine.train import train
        return train
    if name == "restore_model":
        from .engine.restore import restore_model
        return restore_model
    if name == "get_adapter":
        from .adapters.base import get_adapter
        return get_adapter
    if name == "METHODS":
        from .distill.methods import METHODS
        return METHODS
    raise AttributeError(f"module 'detdistill' has no attribute {name!r}")
