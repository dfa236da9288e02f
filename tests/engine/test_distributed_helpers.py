"""DDP helpers: logged values are means over the ranks; ranks die with their launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detdistill.engine.distributed import DistInfo, mean_over_ranks

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _dist_helpers_worker as worker  # noqa: E402


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_logged_values_are_the_mean_over_ranks(tmp_path):
    mp.start_processes(worker.run, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got == pytest.approx({"loss": 1.5, "loss/kd/pkd": 5.0, "lr": 0.01}), r
    assert mean_over_ranks({"loss": 2.0}, DistInfo()) == {"loss": 2.0}  # one process: unchanged


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux-only")
def test_a_rank_exits_when_its_launcher_is_killed(tmp_path):
    """A launcher killed with SIGKILL forwards no signal; the rank still exits (parent-death signal)."""
    pid_file = tmp_path / "child.pid"
    child = textwrap.dedent(f"""
        import os, time
        from detdistill.engine.distributed import exit_with_parent
        assert exit_with_parent()
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(120)
    """)
    launcher = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {child!r}])
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.1)
        pid = int(pid_file.read_text())
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while _alive(pid):
            assert time.monotonic() < deadline, "the orphaned rank kept running"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by init) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
