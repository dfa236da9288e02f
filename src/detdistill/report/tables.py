"""Plain-text and Markdown metric tables, and seed aggregation.

Cell rules shared by both renderers:

* floats -> 1 decimal, ints as ints, ``nan`` / ``None`` / missing -> ``—``;
* a column ``k`` absent from a row but with ``k_mean`` (and optionally ``k_std``)
  present renders as ``mean ± std`` -- the shape :func:`aggregate_seeds` produces.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

__all__ = ["format_metrics_table", "markdown_table", "aggregate_seeds", "format_cell"]

MISSING = "—"


def _fmt_number(v: Any) -> str:
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        f = float(v)
        return MISSING if math.isnan(f) else f"{f:.1f}"
    # 0-d tensors / numpy scalars expose item(); anything else is shown verbatim.
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return _fmt_number(v.item())
    return str(v)


def format_cell(row: Mapping[str, Any], key: str) -> str:
    """Render ``row[key]``, falling back to ``row[key_mean] ± row[key_std]``."""
    if key in row:
        return _fmt_number(row[key])
    mean_key = f"{key}_mean"
    if mean_key in row:
        mean = _fmt_number(row[mean_key])
        if mean == MISSING:
            return MISSING
        std = row.get(f"{key}_std")
        std_s = _fmt_number(std) if std is not None else MISSING
        return mean if std_s == MISSING else f"{mean} ± {std_s}"
    return MISSING


def _is_numeric_column(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    """Right-align columns whose present values are all numbers (or mean/std pairs)."""
    seen = False
    for r in rows:
        v = r.get(key, r.get(f"{key}_mean"))
        if v is None:
            continue
        if isinstance(v, str) or (not isinstance(v, numbers.Number) and not hasattr(v, "item")):
            return False
        seen = True
    return seen


def format_metrics_table(rows: list[dict], columns: list[str], *, title: str | None = None) -> str:
    """Monospace table for the terminal.

    Args:
        rows: one mapping per table row.
        columns: keys to show, in order (also used as headers).
        title: optional line printed above the table.
    """
    cells = [[format_cell(r, c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [_is_numeric_column(rows, c) for c in columns]

    def line(vals: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [] if title is None else [title]
    out.append(line(columns))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """GitHub-flavoured Markdown table (numeric columns right-aligned)."""

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    numeric = [_is_numeric_column(rows, c) for c in columns]
    out = [
        "| " + " | ".join(esc(c) for c in columns) + " |",
        "|" + "|".join("---:" if num else "---" for num in numeric) + "|",
    ]
    for r in rows:
        out.append("| " + " | ".join(esc(format_cell(r, c)) for c in columns) + " |")
    return "\n".join(out)


def aggregate_seeds(runs: list[dict[str, float]]) -> dict:
    """Mean and sample std (ddof=1; 0 for a single run) of every numeric key across runs.

    Returns ``{f"{k}_mean": ..., f"{k}_std": ..., "num_runs": n}``. A key missing
    from some runs is aggregated over the runs that have it; ``None`` counts as ``nan``
    (so an undefined metric in any seed stays undefined rather than being silently
    dropped). Non-numeric values (e.g. a ``name``) are kept if identical in all runs.
    """
    if not runs:
        raise ValueError("aggregate_seeds needs at least one run")
    keys: list[str] = []
    for r in runs:
        keys.extend(k for k in r if k not in keys)

    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in runs if k in r]
        if all(v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool)) for v in vals):
            xs = [float("nan") if v is None else float(v) for v in vals]
            n = len(xs)
            mean = sum(xs) / n
            var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
            out[f"{k}_mean"] = mean
            out[f"{k}_std"] = math.sqrt(var) if not math.isnan(var) else float("nan")
        elif all(v == vals[0] for v in vals):
            out[k] = vals[0]
    out["num_runs"] = len(runs)
    return out
