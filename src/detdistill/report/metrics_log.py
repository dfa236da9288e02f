"""Append-only JSONL metrics log, mirrored to TensorBoard.

``metrics.jsonl`` is the source of truth (plots, tables and benchmarks read it);
TensorBoard is a convenience view. Each line is one flat JSON object::

    {"step": 120, "split": "train", "time": 1718000000.0, "loss": 1.23, "loss_kd": 0.4}

Non-finite floats are written as ``null`` (strict JSON) and read back as ``nan``.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
from pathlib import Path
from typing import Any, Mapping

__all__ = ["MetricsLogger", "read_metrics", "RESERVED_KEYS"]

log = logging.getLogger(__name__)

# Bookkeeping keys of every record; never treated as metric values.
RESERVED_KEYS = frozenset({"step", "split", "time"})
_SPLITS = ("train", "eval")


def _json_safe(v: Any) -> Any:
    """Python scalar with nan/inf -> None; tensors and numpy scalars unwrapped."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        f = float(v)
        return f if math.isfinite(f) else None
    raise TypeError(f"metric value must be a scalar, got {type(v).__name__}")


class MetricsLogger:
    """Writes ``run_dir/metrics.jsonl`` (one flushed line per :meth:`log`) and ``run_dir/tb``.

    Meant to live on rank 0 only. Usable as a context manager.

    Args:
        run_dir: run directory (created if needed); an existing log is appended to,
            so resumed runs keep one history.
        tensorboard: also mirror scalars to TensorBoard (silently disabled with a
            warning if tensorboard is not importable).
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None,
                 final_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate(resume_step, final_step)
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
            except Exception as e:  # missing tensorboard must not kill a training run
                log.warning("TensorBoard logging disabled: %s", e)

    def _truncate(self, resume_step: int, final_step: int | None) -> None:
        """Drop the records a resumed run will write again: training steps after ``resume_step``,
        and evaluations after it (at it too when it is the final step, which is evaluated again)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                step, split = int(rec["step"]), rec["split"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill mid-write
            redo = step > resume_step or (split == "eval" and step == resume_step and resume_step == final_step)
            if not redo:
                keep.append(line)
        self.path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")

    def log(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        """Append one record and mirror its numeric values as ``f"{split}/{key}"`` scalars."""
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if self._fh is None:
            raise RuntimeError("MetricsLogger is closed")
        clash = RESERVED_KEYS.intersection(values)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved")
        step = int(step)
        record: dict[str, Any] = {"step": step, "split": split, "time": time.time()}
        record.update({str(k): _json_safe(v) for k, v in values.items()})
        self._fh.write(json.dumps(record, allow_nan=False) + "\n")
        self._fh.flush()  # a crashed run still leaves every completed line on disk

        if self._tb is not None:
            for k, v in values.items():
                v = v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v
                if isinstance(v, numbers.Real) and not isinstance(v, bool):
                    # TensorBoard shows nan as a gap, which is the honest rendering.
                    self._tb.add_scalar(f"{split}/{k}", float(v), step)

    def flush(self) -> None:
        """Flush the TensorBoard writer (the JSONL file is flushed on every line)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Close the file and the TensorBoard writer; safe to call twice."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def read_metrics(path: str | Path) -> list[dict]:
    """Load a ``metrics.jsonl`` (or the run directory holding one) as a list of dicts.

    ``null`` values come back as ``float('nan')``. An unparsable line (typically the
    last one of a run killed mid-write) is skipped with a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records: list[dict] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping malformed line", path, lineno)
                continue
            records.append({k: float("nan") if v is None else v for k, v in rec.items()})
    return records
