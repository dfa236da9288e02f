"""KD under real 2-process DDP (CPU, gloo, spawn): the KD terms equal the single-process ones."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detdistill.engine.distributed import DistInfo

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # spawned ranks import the worker by module name
    sys.path.insert(0, str(HERE))

import _ddp_kd_worker as worker  # noqa: E402

WORLD_SIZE = 2
TIMEOUT_S = 240


def _spawn(tmp_path: Path) -> None:
    ctx = mp.start_processes(worker.run, args=(WORLD_SIZE, str(tmp_path / "ddp_init"), str(tmp_path)),
                             nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):  # raises with the child's traceback if a rank fails
            if time.monotonic() > deadline:
                pytest.fail(f"DDP ranks did not finish within {TIMEOUT_S}s")
    finally:
        for p in ctx.processes:  # only the ranks started here
            if p.is_alive():
                p.terminate()
                p.join(5)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_kd_terms_under_ddp_match_single_process(tmp_path):
    _spawn(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    assert all(r["wrapped"] for r in ranks), "wrap_ddp did not wrap the student"

    adapter, student, distiller, batch = worker.setup()  # same seeds, same batch, bare model
    ref = worker.one_step(student, adapter, distiller, batch, DistInfo())

    for key in worker.KD_KEYS:
        expected = ref["values"][key]
        assert expected > 0, f"{key} is zero in the single-process reference"
        for r, res in enumerate(ranks):
            got = res["values"][key]
            assert got != 0.0, f"rank {r}: {key} is zero under DDP (module. prefix / hooks not firing?)"
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-6), f"rank {r}: {key}"
    assert ranks[0]["values"]["loss"] == pytest.approx(ref["values"]["loss"], rel=1e-6, abs=1e-6)

    # connectors live outside DDP: their grads are all-reduced to the same average on every rank
    assert ref["connector_grads"]
    for r, res in enumerate(ranks):
        assert res["connector_grads"].keys() == ref["connector_grads"].keys()
        for k, g in ref["connector_grads"].items():
            torch.testing.assert_close(res["connector_grads"][k], g, rtol=1e-5, atol=1e-7, msg=f"rank {r}: {k}")
