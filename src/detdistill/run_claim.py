"""One writer per run folder: an advisory lock that lets several benches share the work.

Two ``detdistill bench`` processes given overlapping seeds used to train the same run folder at
once, both writing its checkpoints and ``metrics.jsonl``. A bench now *claims* a run before it
trains it: an exclusive, non-blocking ``flock`` on ``<run>/.claim``. A second bench that finds
the run claimed skips it and says which process holds it; the first one's report (or a later
``detdistill bench SPEC``) picks the run up once it has finished.

The operating system drops the lock when the holding process exits, however it exits (a crash,
``kill -9``, a reboot), so a claim is never stale and nothing needs cleaning up. Where ``fcntl``
does not exist (Windows) there is no lock: give each bench its own seeds or methods there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks in the standard library that survive a crash cleanly
    fcntl = None  # type: ignore[assignment]

CLAIM_FILE = ".claim"


@dataclass(frozen=True)
class RunClaim:
    """Whether this process holds the run; when it does not, ``holder`` names the process that does."""

    held: bool
    holder: str = ""


@contextmanager
def claim_run(run_dir: Path) -> Iterator[RunClaim]:
    """Hold ``run_dir`` for the ``with`` block if no other process holds it.

    Yields ``RunClaim(held=True)`` when the lock was taken (the holder's pid and host are written
    into the claim file for others to read), else ``RunClaim(held=False, holder=...)`` at once:
    it never waits, because a bench should move on to runs nobody is training.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield RunClaim(held=True)
        return
    path = run_dir / CLAIM_FILE
    # "a+": open without truncating, so a refused claimant does not erase the holder's pid
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            yield RunClaim(held=False, holder=f.read().strip() or "another process")
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            f.flush()
            yield RunClaim(held=True)
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
