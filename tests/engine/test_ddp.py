"""DistributedDataParallel on 2 CPU processes (gloo) against single-process references.

What is checked, and why the setup makes the identities exact (up to float summation order):

1. DDP's promise: after ``backward`` every rank holds the *mean* of the per-rank gradients,
   i.e. ``(g(half_0) + g(half_1)) / 2`` where ``g(half_r)`` is the single-process gradient on
   rank r's half batch. This holds for any model and loss.

2. The stronger identity "DDP on 2x2 images == one process on the 4-image batch" holds only
   when the loss of the full batch is the mean of the half-batch losses. Two things break
   that in general, and the setup removes both:

   - torchvision's FCOS normalises every loss term by the number of foreground locations
     *of the whole batch*: ``L(full) = (S_0 + S_1) / (N_0 + N_1)`` but DDP averages
     ``(S_0 / N_0 + S_1 / N_1) / 2``. Equal iff ``N_0 == N_1``. Foreground assignment depends
     only on the boxes and the anchor grid, never on pixels, so image ``i`` and image ``i + 2``
     get *the same boxes*: each half then has exactly the same number of positives.
   - BatchNorm in train mode normalises with per-rank batch statistics, so a half batch sees
     different activations than the full batch. The model uses ``norm="gn"`` (GroupNorm is
     per-sample; the FCOS head already uses GroupNorm).

   All images share one size, so the transform pads them identically in both settings.

The optional evaluation check runs ``engine.evaluate`` sharded over the 2 ranks (rank r
predicts images r, r+2, ...; the evaluator state is gathered) and compares the EvalResult with
one process. A stub adapter returns fixed, imperfect detections per image so that the AP is
neither 0 nor 100 and does not depend on training.

Workers are separate Python processes that call this file's ``_worker`` and join the group
through :func:`detdistill.engine.distributed.init_distributed`, exactly as under ``torchrun``
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` in the environment).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detdistill.adapters.base import get_adapter, unwrap
from detdistill.config import EvalConfig, ModelConfig
from detdistill.data.dataset import EvalDataset
from detdistill.data.transforms import EvalTransform
from detdistill.data.yolo import load_yolo
from detdistill.engine.evaluate import evaluate
from detdistill.structures import Batch, Detections, Target

MODEL = dict(arch="fcos", backbone="resnet18", fpn_channels=32, head_convs=1, norm="gn")
NUM_CLASSES = 3
SIZE = 128
EVAL_IMAGES = ("MOS74.jpg", "MOS78.jpg", "MOS82.jpg")  # odd count: uneven shards (2 + 1)


# ----------------------------------------------------------------------------- shared pieces
def _fixed_batch() -> Batch:
    """4 random 128x128 images; image i and i+2 carry the same boxes (same positives per half)."""
    g = torch.Generator().manual_seed(123)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(4)]
    layouts = [
        (torch.tensor([[8.0, 10.0, 40.0, 36.0], [60.0, 64.0, 100.0, 120.0], [70.0, 5.0, 90.0, 25.0]]), torch.tensor([0, 2, 1])),
        (torch.tensor([[20.0, 30.0, 52.0, 60.0], [30.0, 80.0, 110.0, 126.0]]), torch.tensor([1, 0])),
    ]
    targets = [Target(*layouts[i % 2], image_id=i) for i in range(4)]
    return Batch(images, targets)


def _build(init_state: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_adapter("torchvision").build(ModelConfig(**MODEL), NUM_CLASSES)
    if init_state is not None:
        model.load_state_dict(init_state)
    return model


def _grads(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Gradients of the summed loss terms, by parameter name of the *bare* model."""
    model.zero_grad(set_to_none=True)
    losses, _ = get_adapter("torchvision").forward_train(model, batch)  # through DDP when wrapped
    sum(losses.values()).backward()
    return {n: p.grad.detach().clone() for n, p in unwrap(model).named_parameters() if p.grad is not None}


def _half(batch: Batch, rank: int) -> Batch:
    return Batch(batch.images[2 * rank:2 * rank + 2], batch.targets[2 * rank:2 * rank + 2])


class _StubAdapter:
    """``predict`` returns fixed detections per image (looked up by pixel content)."""

    def __init__(self, dataset: EvalDataset) -> None:
        self.table: dict[float, Detections] = {}
        for i in range(len(dataset)):
            image, target = dataset[i]
            boxes = target.boxes.clone()
            k = len(boxes)
            shift = torch.arange(k, dtype=torch.float32).remainder(5).unsqueeze(1) * 2.0  # 0..8 px off
            boxes = boxes + shift * torch.tensor([1.0, 1.0, 1.0, 1.0])
            fp = torch.tensor([[1.0, 1.0, 15.0, 15.0]])  # a false positive with a high score
            scores = torch.cat([torch.linspace(0.9, 0.3, k), torch.tensor([0.95])])
            labels = torch.cat([target.labels, torch.tensor([0])])
            self.table[self._key(image)] = Detections(torch.cat([boxes, fp]), scores, labels)

    @staticmethod
    def _key(image: torch.Tensor) -> float:
        return round(float(image.double().sum()), 3)

    def predict(self, model, images):
        return [self.table[self._key(im)] for im in images]


def _eval_result(list_file: Path, classes: Path, info=None):
    dataset = EvalDataset(load_yolo(list_file, classes=classes), EvalTransform())
    return evaluate(None, _StubAdapter(dataset), dataset, EvalConfig(), torch.device("cpu"), info=info, progress=False)


# ----------------------------------------------------------------------------- worker process
def _worker(work: str) -> None:
    """One DDP rank: gradients of its half batch through DDP, then a sharded evaluation."""
    from detdistill.engine.distributed import cleanup, init_distributed, wrap_ddp

    torch.set_num_threads(1)
    work_dir = Path(work)
    device = torch.device("cpu")
    info = init_distributed(device)
    assert info.enabled and info.world_size == 2
    try:
        model = _build(torch.load(work_dir / "init.pt", weights_only=True))
        ddp = wrap_ddp(model, info, device)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        grads = _grads(ddp, _half(_fixed_batch(), info.rank))
        result = _eval_result(work_dir / "eval" / "list.txt", work_dir / "eval" / "classes.txt", info)
        torch.save({"grads": grads, "eval": result.as_dict()}, work_dir / f"rank{info.rank}.pt")
    finally:
        cleanup(info)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(work: Path, world: int = 2, timeout: float = 240.0) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    code = "import runpy, sys; runpy.run_path(sys.argv[1])['_worker'](sys.argv[2])"
    procs = []
    for rank in range(world):
        procs.append(subprocess.Popen([sys.executable, "-c", code, __file__, str(work)],
                                      env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed (exit {p.returncode}):\n{out[-4000:]}"


# ----------------------------------------------------------------------------- the test
def _mismatches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5,
                atol: float = 1e-7) -> list[str]:
    """Names whose gradients differ: ``|a - b| > rtol * |b| + atol`` (L2 norms per tensor).

    The ``atol`` floor is for gradients that are zero in exact arithmetic: the conv biases in
    front of the FCOS head's GroupNorm get ~1e-9 of float32 noise (differences ~1e-9), whose
    relative error is meaningless. Gradients of ordinary size are held to ``rtol`` (measured
    worst relative error ~2e-6); a global relative check over all gradients backs this up.
    """
    return [f"{n}: |diff| {float((a[n] - ref).norm()):.2e} vs |ref| {float(ref.norm()):.2e}"
            for n, ref in b.items() if float((a[n] - ref).norm()) > rtol * float(ref.norm()) + atol]


def _flat(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g[n].flatten() for n in sorted(g)])


def test_ddp_gradients_and_sharded_eval_match_single_process(tmp_path, crop_dataset, single_thread):
    init = _build().state_dict()
    torch.save(init, tmp_path / "init.pt")
    eval_ds = crop_dataset(names=EVAL_IMAGES, size=SIZE)
    (tmp_path / "eval").symlink_to(eval_ds["root"], target_is_directory=True)

    _launch(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # Single-process references from the same initial weights.
    batch = _fixed_batch()
    model = _build(init)
    full = _grads(model, batch)
    halves = [_grads(model, _half(batch, r)) for r in range(2)]
    mean_of_halves = {n: (halves[0][n] + halves[1][n]) / 2 for n in full}

    ddp0, ddp1 = ranks[0]["grads"], ranks[1]["grads"]
    assert set(ddp0) == set(ddp1) == set(full), "DDP and single process disagree on which parameters get grads"
    assert len(full) > 50
    for n in full:  # ranks hold identical gradients after the all-reduce
        assert torch.equal(ddp0[n], ddp1[n]), f"ranks disagree on {n} after the all-reduce"
    # (1) DDP == mean of per-rank single-process gradients (float32 summation order only).
    assert not _mismatches(ddp0, mean_of_halves), _mismatches(ddp0, mean_of_halves)[:5]
    # (2) == full-batch single process, thanks to equal positives per half and GroupNorm.
    assert not _mismatches(ddp0, full), _mismatches(ddp0, full)[:5]
    rel = float((_flat(ddp0) - _flat(full)).norm() / _flat(full).norm())
    assert rel < 1e-5, f"DDP vs full batch: global relative error {rel:.2e}"
    # The halves really differ (the checks above do not compare a thing with itself).
    assert float((_flat(halves[0]) - _flat(halves[1])).norm() / _flat(full).norm()) > 1e-2

    # Sharded evaluation == one process; the stub makes the numbers non-trivial.
    single = _eval_result(eval_ds["list"], eval_ds["classes"]).as_dict()
    assert 5.0 < single["AP"] < 95.0 and single["num_images"] == len(EVAL_IMAGES)
    for r in range(2):
        assert ranks[r]["eval"] == pytest.approx(single, nan_ok=True), f"rank {r}"


def test_ema_is_the_same_on_every_rank_and_is_what_rank_0_saves(tmp_path, tiny_config_yaml, single_thread):
    """A 2-rank run of 3 steps: each rank averages its own (identical) weights, so the ranks'
    EMAs agree bitwise, and the checkpoint rank 0 writes holds that EMA."""
    import socket

    import torch.multiprocessing as mp

    from detdistill.engine.checkpoint import load_checkpoint

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # spawned ranks import the worker by name
        sys.path.insert(0, here)
    import _ddp_train_worker as worker

    cfg_path = tiny_config_yaml(train__steps=3, train__batch_size=2, train__ema_decay=0.5, train__ema_warmup_steps=1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker.run, args=(2, port, str(cfg_path), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert int(r0["ema"]["n_averaged"]) == 3
    for k in r0["ema"]:
        assert torch.equal(r0["ema"][k], r1["ema"][k]), f"ranks' EMAs differ at {k}"
    saved = load_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")["ema"]
    for k in r0["ema"]:
        assert torch.equal(saved[k], r0["ema"][k]), k
    assert any(not torch.equal(r0["ema"][f"module.{k}"], v) for k, v in r0["model"].items() if v.is_floating_point())
