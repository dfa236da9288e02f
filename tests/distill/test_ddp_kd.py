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


def _spawn(tmp_path: Path, method: str = "pkd_l2") -> None:
    ctx = mp.start_processes(worker.run, args=(WORLD_SIZE, str(tmp_path / "ddp_init"), str(tmp_path), method),
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


def _ranks_and_references(tmp_path: Path, method: str = "pkd_l2") -> tuple[list[dict], list[dict]]:
    """What each DDP rank wrote, and the same step in one process on that rank's batch (same
    seeds, bare model): values, connector and student gradients, the ``normalize`` factors."""
    _spawn(tmp_path, method)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    refs = []
    for r in range(WORLD_SIZE):
        adapter, student, distiller, batch = worker.setup(r, method)
        ref = worker.one_step(student, adapter, distiller, batch, DistInfo())
        ref["student_grads"] = {k: p.grad.detach().clone() for k, p in student.named_parameters() if p.grad is not None}
        ref["kd_scales"] = distiller.state_dict().get("kd_scales")
        refs.append(ref)
    return ranks, refs


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_kd_under_ddp_with_different_batches_per_rank(tmp_path):
    """Each rank distils its own batch. Per rank, the KD terms equal a single process on that
    batch; the connectors (outside DDP) end with the *mean* of the per-batch gradients on
    every rank; and a NaN on one rank stops every rank at that step with the term named."""
    ranks, refs = _ranks_and_references(tmp_path)
    assert all(r["wrapped"] for r in ranks), "wrap_ddp did not wrap the student"

    for key in worker.KD_KEYS:
        for r, res in enumerate(ranks):
            expected = refs[r]["values"][key]
            assert expected > 0, f"{key} is zero in the single-process reference"
            got = res["values"][key]
            assert got != 0.0, f"rank {r}: {key} is zero under DDP (module. prefix / hooks not firing?)"
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-6), f"rank {r}: {key}"
        assert refs[0]["values"][key] != pytest.approx(refs[1]["values"][key], rel=1e-3), "the batches do not differ"

    # connectors live outside DDP: their grads are all-reduced to the same average on every rank
    g0, g1 = refs[0]["connector_grads"], refs[1]["connector_grads"]
    assert g0 and g0.keys() == g1.keys()
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(g)])  # noqa: E731
    assert float((flat(g0) - flat(g1)).norm() / flat(g0).norm()) > 1e-2, "per-rank connector grads barely differ"
    for r, res in enumerate(ranks):
        assert res["connector_grads"].keys() == g0.keys()
        for k in g0:
            torch.testing.assert_close(res["connector_grads"][k], (g0[k] + g1[k]) / 2, rtol=1e-5, atol=1e-7,
                                       msg=f"rank {r}: connector {k} is not the mean over ranks")

    # NaN on rank 1 only: both ranks raise, name the step, the rank and the term, and keep their weights
    for r, res in enumerate(ranks):
        msg = res["nan_step"]
        assert msg.startswith("step 0: non-finite"), f"rank {r} did not stop: {msg}"
        assert f"rank 1: {worker.NAN_TERM}=nan" in msg and "rank 0:" not in msg, f"rank {r}: {msg}"
        assert res["nan_step_changed"] == [], f"rank {r} updated {res['nan_step_changed'][:3]} on the bad step"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_scalekd_under_ddp_runs_and_averages(tmp_path):
    """ScaleKD's assistant sends maps through the DDP student's head a second time (with its
    weights frozen): DDP must not see a second use of its parameters, and the student's and
    the assistant's gradients must be the mean over the ranks' batches."""
    ranks, refs = _ranks_and_references(tmp_path, "scalekd")
    for part in ("feat", "cls", "bbox", "csa"):
        for r, res in enumerate(ranks):
            assert res["values"][f"loss/kd/scalekd/{part}"] == pytest.approx(refs[r]["values"][f"loss/kd/scalekd/{part}"],
                                                                              rel=1e-5), (r, part)
    for key in ("connector_grads", "student_grads"):  # the Distiller's modules, and the DDP student
        g0, g1 = refs[0][key], refs[1][key]
        assert g0
        for r, res in enumerate(ranks):
            for k in g0:
                torch.testing.assert_close(res[key][k], (g0[k] + g1[k]) / 2, rtol=1e-4, atol=1e-6, msg=f"rank {r}: {k}")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_normalize_factor_is_the_mean_over_ranks(tmp_path):
    """A ``normalize`` term's factor (task loss / term at its first step) differs per batch; under
    DDP every rank must use the mean over the ranks, or the ranks would weigh KD differently."""
    ranks, refs = _ranks_and_references(tmp_path, "pkd_normalized")
    s0, s1 = (float(ref["kd_scales"][0]) for ref in refs)
    assert s0 != pytest.approx(s1, rel=1e-3), "the ranks' own factors do not differ: the test cannot tell"
    for r, res in enumerate(ranks):
        assert float(res["kd_scales"][0]) == pytest.approx((s0 + s1) / 2, rel=1e-6), f"rank {r}"
        own = refs[r]["values"]["loss/kd/pkd"] / float(refs[r]["kd_scales"][0])  # the unweighted term on rank r's batch
        assert res["values"]["loss/kd/pkd"] == pytest.approx(own * (s0 + s1) / 2, rel=1e-5), f"rank {r}"
