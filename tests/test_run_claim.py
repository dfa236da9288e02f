"""``detdistill.run_claim``: one writer per run folder, never a stale claim."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from detdistill.run_claim import CLAIM_FILE, claim_run


def test_a_claimed_run_is_refused_with_its_holder_and_free_again_after(tmp_path):
    run = tmp_path / "m" / "seed0"
    with claim_run(run) as first:
        assert first.held
        with claim_run(run) as second:  # a second open of the file is a second claimant, even in one process
            assert not second.held
            assert second.holder.startswith(f"pid {os.getpid()} on ")
        assert (run / CLAIM_FILE).read_text().startswith(f"pid {os.getpid()}")  # the refusal erased nothing
    with claim_run(run) as again:
        assert again.held


def test_a_killed_holder_leaves_no_stale_claim(tmp_path):
    """The lock belongs to the holding process: killed with SIGKILL (no cleanup runs), its claim goes."""
    run = tmp_path / "seed0"
    code = ("import sys, time; from pathlib import Path; from detdistill.run_claim import claim_run\n"
            "with claim_run(Path(sys.argv[1])) as c:\n"
            "    print(c.held, flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        with claim_run(run) as claim:
            assert not claim.held and claim.holder.startswith(f"pid {holder.pid} ")
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        with claim_run(run) as claim:
            if claim.held or time.monotonic() > deadline:
                break
        time.sleep(0.1)
    assert claim.held
