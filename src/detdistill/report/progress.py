"""Progress output that suits where it goes: a live bar on a terminal, plain lines in a log file.

Under CI, ``nohup`` or a pipe, tqdm's carriage returns and cursor codes flood the log with
one redrawn line per update; there, long loops print a plain line every few steps instead.
"""

from __future__ import annotations

import sys


def live_bar(progress: bool) -> bool:
    """Draw tqdm bars: progress is wanted and stderr (where tqdm writes) is a terminal."""
    return progress and sys.stderr.isatty()


def plain_progress_line(name: str, step: int, total: int, loss: float, sec_per_step: float) -> str:
    """``"name: step 120/400 (30%), loss 1.234, 0.52 s/step, ETA 2m26s"``."""
    left = max(total - step, 0) * sec_per_step
    eta = f"{int(left // 3600)}h{int(left % 3600 // 60):02d}m" if left >= 3600 else f"{int(left // 60)}m{int(left % 60):02d}s"
    return f"{name}: step {step}/{total} ({100 * step // max(total, 1)}%), loss {loss:.3f}, {sec_per_step:.2f} s/step, ETA {eta}"
