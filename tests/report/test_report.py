"""Metrics log, plots and tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from detdistill.report import (
    MetricsLogger,
    aggregate_seeds,
    format_metrics_table,
    markdown_table,
    plot_bars,
    plot_run,
    read_metrics,
)
from detdistill.report.plots import ema_smooth

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fill_run(run_dir: Path, tensorboard: bool = False) -> None:
    with MetricsLogger(run_dir, tensorboard=tensorboard) as ml:
        for step in range(0, 60, 5):
            ml.log(step, "train", {"loss": 2.0 / (1 + step), "loss_kd": torch.tensor(0.5 / (1 + step)), "lr": 0.01})
        for step in (20, 40, 60):
            ml.log(step, "eval", {"AP": step / 2, "AP50": step, "AP75": step / 3, "APs": float("nan"),
                                  "APm": 10.0, "APl": np.float32(30.0), "AP/car": 12.5})


# ----------------------------------------------------------------------------- metrics log
def test_metrics_jsonl_roundtrip_with_nan(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as ml:
        ml.log(3, "eval", {"AP": 41.5, "APs": float("nan"), "APl": float("inf"), "n": 7, "x": np.float64(1.25)})
    raw = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(raw) == 1
    assert json.loads(raw[0])["APs"] is None  # strict JSON on disk
    assert "NaN" not in raw[0] and "Infinity" not in raw[0]

    (rec,) = read_metrics(tmp_path)
    assert rec["step"] == 3 and rec["split"] == "eval"
    assert rec["AP"] == 41.5 and rec["n"] == 7 and rec["x"] == 1.25
    assert math.isnan(rec["APs"]) and math.isnan(rec["APl"])


def test_metrics_appends_flushes_and_validates(tmp_path: Path) -> None:
    ml = MetricsLogger(tmp_path, tensorboard=False)
    ml.log(1, "train", {"loss": 1.0})
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1  # flushed before close
    with pytest.raises(ValueError):
        ml.log(2, "test", {"loss": 1.0})
    with pytest.raises(ValueError):
        ml.log(2, "train", {"step": 1.0})
    ml.close()
    ml.close()  # idempotent
    with MetricsLogger(tmp_path, tensorboard=False) as ml2:  # resume appends
        ml2.log(2, "train", {"loss": 0.5})
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "spl')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_tensorboard_mirror(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path) as ml:
        ml.log(1, "train", {"loss": 1.0})
        ml.log(2, "eval", {"AP": 30.0, "APs": float("nan")})
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/AP", "eval/APs"} <= tags
    assert acc.Scalars("eval/AP")[0].value == pytest.approx(30.0)


# ----------------------------------------------------------------------------- plots
def test_plot_run_writes_pngs(tmp_path: Path) -> None:
    _fill_run(tmp_path)
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["ap_curves.png", "loss_curves.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_plot_run_skips_missing_parts(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as ml:
        ml.log(1, "train", {"loss": -0.5})  # non-positive: linear axis
        ml.log(2, "train", {"loss": 0.5})
    assert [p.name for p in plot_run(tmp_path)] == ["loss_curves.png"]


def test_plot_bars(tmp_path: Path) -> None:
    rows = [
        {"name": "baseline", "AP_mean": 30.0, "AP_std": 0.4, "AP50_mean": 50.0, "AP50_std": 0.2},
        {"name": "pkd", "AP_mean": 32.5, "AP_std": 0.3, "AP50_mean": float("nan"), "AP50_std": 0.0},
        {"name": "plain", "AP": 31.0},
    ]
    out = plot_bars(rows, ["AP", "AP50"], tmp_path / "sub" / "bars.png", "methods")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000


def test_plot_bars_draws_error_bars_only_for_a_measured_spread(tmp_path: Path, monkeypatch) -> None:
    """A single run (no std, as in the quickstart) gets no error bar: a zero-height cap would read
    as a spread that was measured; a row over seeds keeps its bars."""
    from detdistill.report import plots

    figures = []
    new_figure = plots._new_figure
    monkeypatch.setattr(plots, "_new_figure", lambda size: figures.append(new_figure(size)) or figures[-1])
    rows = [{"name": "seeds", "AP_mean": 30.0, "AP_std": 0.4}, {"name": "one run", "AP": 31.0}]
    plot_bars(rows, ["AP"], tmp_path / "bars.png", "methods")
    (ax,) = figures[0].axes
    assert [c.errorbar is not None for c in ax.containers if hasattr(c, "errorbar")] == [True, False]


def test_ema_smooth() -> None:
    assert ema_smooth([]) == []
    assert ema_smooth([3.0, 3.0, 3.0], weight=0.9) == pytest.approx([3.0, 3.0, 3.0])  # debiased
    s = ema_smooth(list(np.r_[np.zeros(50), np.ones(50)]))
    assert s[49] == pytest.approx(0.0) and 0.5 < s[-1] <= 1.0


# ----------------------------------------------------------------------------- tables
def test_format_metrics_table() -> None:
    rows = [
        {"name": "baseline", "AP": 37.26, "APs": float("nan"), "imgs": 500},
        {"name": "pkd", "AP_mean": 38.04, "AP_std": 0.26, "APs": None},
    ]
    text = format_metrics_table(rows, ["name", "AP", "APs", "imgs"], title="val2017")
    assert text.splitlines() == [
        "val2017",
        "name              AP  APs  imgs",
        "--------  ----------  ---  ----",
        "baseline        37.3    —   500",
        "pkd       38.0 ± 0.3    —     —",
    ]


def test_markdown_table() -> None:
    rows = [{"method": "a|b", "AP": 1.04}, {"method": "c", "AP_mean": 2.0, "AP_std": 0.56}]
    md = markdown_table(rows, ["method", "AP", "AR100"])
    assert md.splitlines() == [
        "| method | AP | AR100 |",
        "|---|---:|---|",
        "| a\\|b | 1.0 | — |",
        "| c | 2.0 ± 0.6 | — |",
    ]


def test_aggregate_seeds() -> None:
    runs = [{"name": "pkd", "AP": 30.0, "APs": float("nan"), "AP50": 50.0},
            {"name": "pkd", "AP": 32.0, "APs": float("nan"), "AP50": 51.0},
            {"name": "pkd", "AP": 34.0, "APs": float("nan")}]
    agg = aggregate_seeds(runs)
    assert agg["name"] == "pkd" and agg["num_runs"] == 3
    assert agg["AP_mean"] == pytest.approx(32.0)
    assert agg["AP_std"] == pytest.approx(np.std([30.0, 32.0, 34.0], ddof=1))  # = 2.0
    assert agg["AP50_mean"] == pytest.approx(50.5) and agg["AP50_std"] == pytest.approx(np.std([50, 51], ddof=1))
    assert math.isnan(agg["APs_mean"])
    single = aggregate_seeds([{"AP": 12.0}])
    assert single == {"AP_mean": 12.0, "AP_std": 0.0, "num_runs": 1}
    assert "32.0 ± 2.0" in format_metrics_table([agg], ["AP"])
    with pytest.raises(ValueError):
        aggregate_seeds([])


def test_progress_is_plain_lines_without_a_terminal(tiny_config, capsys, monkeypatch):
    """Under CI or nohup (stderr not a TTY) training prints one plain line per logging window
    and no carriage-return bar frames."""
    from detdistill.engine.train import train
    from detdistill.report.progress import plain_progress_line

    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    lines: list[str] = []
    train(tiny_config(train__steps=2, train__log_every=1), resume=False, progress=True, log=lines.append)
    err = capsys.readouterr().err
    assert "\r" not in err
    steps = [ln for ln in lines if ": step " in ln and "s/step" in ln]
    assert [ln.split(": step ")[1].split("/")[0] for ln in steps] == ["1", "2"], lines
    assert plain_progress_line("run", 100, 400, 1.23456, 0.5) == \
        "run: step 100/400 (25%), loss 1.235, 0.50 s/step, ETA 2m30s"
    assert plain_progress_line("run", 0, 10_000, 1.0, 2.0).endswith("ETA 5h33m")
