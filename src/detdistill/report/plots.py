"""Training-curve and benchmark plots from ``metrics.jsonl``.

Figures are drawn on explicit :class:`~matplotlib.figure.Figure` objects with the Agg
canvas, never through ``pyplot``: no global backend switch, no GUI, and safe to call
from a training process or a notebook alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from detdistill.report.metrics_log import RESERVED_KEYS, read_metrics

__all__ = ["plot_run", "plot_bars", "ema_smooth", "AP_KEYS"]

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _new_figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def ema_smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing).

    ``weight=None`` picks one from the series length so that short runs are not flattened.
    """
    n = len(values)
    if n == 0:
        return []
    if weight is None:
        weight = min(0.9, max(0.0, 1.0 - 10.0 / n))
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = weight * acc + (1.0 - weight) * v
        # Dividing by (1 - w^i) removes the bias towards the zero initialisation.
        out.append(acc / (1.0 - weight**i) if weight > 0 else v)
    return out


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = sorted((r["step"], r[key]) for r in records if _finite(r.get(key)))
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _loss_keys(train: list[dict]) -> list[str]:
    """Every train key whose name mentions 'loss', in first-seen order."""
    keys: list[str] = []
    for r in train:
        keys.extend(k for k in r if k not in RESERVED_KEYS and "loss" in k.lower() and k not in keys)
    return keys


def _plot_losses(train: list[dict], out: Path) -> Path | None:
    keys = _loss_keys(train)
    series = {k: _series(train, k) for k in keys}
    series = {k: s for k, s in series.items() if s[0]}
    if not series:
        return None
    fig = _new_figure((8, 5))
    ax = fig.add_subplot(1, 1, 1)
    all_pos = all(v > 0 for _, ys in series.values() for v in ys)
    for i, (k, (xs, ys)) in enumerate(series.items()):
        color = f"C{i % 10}"
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)  # raw, faint
        ax.plot(xs, ema_smooth(ys), color=color, linewidth=1.6, label=k)
    if all_pos:
        ax.set_yscale("log")  # loss terms span decades; log keeps them all readable
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training losses")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(series) > 6 else 1)
    fig.tight_layout()
    fig.savefig(out)
    return out


def _plot_ap(evals: list[dict], out: Path) -> Path | None:
    series = {k: _series(evals, k) for k in AP_KEYS}
    series = {k: s for k, s in series.items() if s[0]}
    if not series:
        return None
    fig = _new_figure((8, 5))
    ax = fig.add_subplot(1, 1, 1)
    for k, (xs, ys) in series.items():
        style = "-" if k in ("AP", "AP50", "AP75") else "--"
        ax.plot(xs, ys, style, marker="o", markersize=3, label=k, linewidth=1.8 if k == "AP" else 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("AP (%)")
    ax.set_title("evaluation")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw ``loss_curves.png`` and ``ap_curves.png`` into ``run_dir`` from its ``metrics.jsonl``.

    A figure is skipped when there is nothing to draw (no train losses / no eval AP).

    Returns:
        The paths of the PNGs written.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    written = [
        _plot_losses(train, run_dir / "loss_curves.png"),
        _plot_ap(evals, run_dir / "ap_curves.png"),
    ]
    return [p for p in written if p is not None]


def plot_bars(rows: list[dict], metric_keys: list[str], out: Path, title: str) -> Path:
    """Grouped bar chart: one group per metric, one bar per row (method), std as error bars.

    Args:
        rows: mappings with ``name`` and ``f"{k}_mean"`` / ``f"{k}_std"`` per metric
            (as produced by :func:`~detdistill.report.tables.aggregate_seeds`); a plain
            ``k`` is accepted as the mean with zero std.
        metric_keys: metrics to show, in order.
        out: PNG path (parent folders are created).
        title: figure title.
    """
    import numpy as np

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_rows, n_keys = len(rows), len(metric_keys)
    fig = _new_figure((max(6.0, 1.2 + n_keys * (0.5 + 0.35 * n_rows)), 4.8))
    ax = fig.add_subplot(1, 1, 1)
    group = np.arange(n_keys, dtype=float)
    width = 0.8 / max(n_rows, 1)
    for i, row in enumerate(rows):
        means, stds = [], []
        for k in metric_keys:
            m = row.get(f"{k}_mean", row.get(k))
            s = row.get(f"{k}_std", 0.0)
            means.append(float(m) if _finite(m) else math.nan)
            stds.append(float(s) if _finite(s) else 0.0)
        xs = group - 0.4 + width * (i + 0.5)
        # nan heights draw nothing, which is the right rendering for an undefined metric.
        # single runs (no std) get no error bars: a zero-height cap reads as a measured spread
        spread = stds if any(s > 0 for s in stds) else None
        bars = ax.bar(xs, means, width, yerr=spread, capsize=3, label=str(row.get("name", i)), color=f"C{i % 10}")
        ax.bar_label(bars, labels=["" if math.isnan(m) else f"{m:.1f}" for m in means], fontsize=7, padding=2)
    ax.set_xticks(group)
    ax.set_xticklabels(metric_keys)
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if n_rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    return out


def plot_paired(per_seed: dict[str, dict[int, float]], baseline: str, metric: str, out: Path, title: str) -> Path:
    """One panel per method: a line per seed from the baseline's value to the method's.

    Lines going up on every seed is a paired gain, whatever the spread between seeds; crossing
    lines are noise. ``per_seed`` maps method name -> ``{seed: value}``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    methods = [m for m in per_seed if m != baseline]
    base = per_seed.get(baseline, {})
    fig = _new_figure((max(4.0, 2.4 * max(len(methods), 1)), 3.8))
    first = None
    for i, name in enumerate(methods):
        ax = fig.add_subplot(1, max(len(methods), 1), i + 1, sharey=first)  # one scale: panels compare
        first = first or ax
        seeds = sorted(s for s in set(base) & set(per_seed[name]) if _finite(base[s]) and _finite(per_seed[name][s]))
        for j, s in enumerate(seeds):
            b, m = base[s], per_seed[name][s]
            ax.plot([0, 1], [b, m], marker="o", color="C2" if m > b else "C3" if m < b else "C7", alpha=0.8)
            ax.annotate(f"s{s}", (1, m), textcoords="offset points", xytext=(4, 0), fontsize=7, va="center")
        gains = [per_seed[name][s] - base[s] for s in seeds]
        mean = sum(gains) / len(gains) if gains else math.nan
        ax.set_xticks([0, 1], [baseline, name], fontsize=8)
        ax.set_xlim(-0.3, 1.4)
        ax.set_title(f"{name}: {mean:+.1f}" if gains else name, fontsize=9)
        if i == 0:
            ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out
