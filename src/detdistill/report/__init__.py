"""Reporting: metrics log (JSONL + TensorBoard), plots and tables.

matplotlib and tensorboard are imported lazily, so importing this package is cheap.
"""

from detdistill.report.metrics_log import MetricsLogger, read_metrics
from detdistill.report.plots import plot_bars, plot_run
from detdistill.report.tables import aggregate_seeds, format_metrics_table, markdown_table

__all__ = [
    "MetricsLogger",
    "read_metrics",
    "plot_run",
    "plot_bars",
    "format_metrics_table",
    "markdown_table",
    "aggregate_seeds",
]
