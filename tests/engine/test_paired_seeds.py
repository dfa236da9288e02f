"""Paired seeds: for one seed, every bench method's run starts from the same student weights,
draws the same crops in the same order, and continues the same global RNG stream, so the
per-seed difference against the student alone is the method's effect alone."""

from __future__ import annotations

import pytest
import torch

from detdistill.engine.setup import build_run
from detdistill.engine.train import train

pytestmark = pytest.mark.usefixtures("single_thread")

TERMS = {
    "alone": [],
    "l2": [{"method": "l2", "pairs": [["neck.p3", "neck.p3"], ["neck.p4", "neck.p4"]]}],  # 32 -> 64 connectors
    "pkd": [{"method": "pkd", "pairs": [["neck.p3", "neck.p3"]]}],
    "kl": [{"method": "kl"}],
    "scalekd": [{"method": "scalekd", "pairs": [[f"neck.p{k}", f"neck.p{k}"] for k in (3, 4, 5, 6, 7)]}],
}


@pytest.mark.parametrize("seed", [0, 3])
def test_every_method_starts_from_the_same_student_crops_and_rng(tmp_path, tiny_config, seed: int) -> None:
    teacher = train(tiny_config(root=tmp_path / "teacher", model__fpn_channels=64, train__steps=1),
                    resume=False, progress=False, log=lambda _m: None)
    ckpt = str(teacher.run_dir / "checkpoints" / "last.pt")
    seen = {}
    for name, terms in TERMS.items():
        extra = {"teacher": {"checkpoint": ckpt}, "distill": terms} if terms else {}
        cfg = tiny_config(root=tmp_path / name, seed=seed, **extra)
        run = build_run(cfg, resume=False, log=lambda _m: None)
        rng_after_build = torch.get_rng_state()
        it = iter(run.loader)
        batches = [next(it) for _ in range(3)]
        seen[name] = (run.model.state_dict(), rng_after_build, batches)
        if run.distiller is not None:
            assert len(list(run.distiller.parameters())) > 0 or name in ("pkd", "kl")  # l2 / scalekd own modules
            run.distiller.remove_hooks()
    weights, rng, batches = seen["alone"]
    for name, (w, r, b) in seen.items():
        for k, v in weights.items():
            assert torch.equal(w[k], v), f"{name}: student weight {k} differs from the run without KD"
        assert torch.equal(r, rng), f"{name}: building the distiller moved the global RNG"
        for i, (x, y) in enumerate(zip(b, batches)):
            assert all(torch.equal(p, q) for p, q in zip(x.images, y.images)), f"{name}: crop {i} differs"
            assert all(torch.equal(p.boxes, q.boxes) and torch.equal(p.labels, q.labels)
                       for p, q in zip(x.targets, y.targets)), f"{name}: boxes of crop {i} differ"


def test_different_seeds_do_differ(tmp_path, tiny_config) -> None:
    """The check above is not vacuous: another seed gives other weights and crops."""
    a = build_run(tiny_config(root=tmp_path / "a", seed=0), resume=False, log=lambda _m: None)
    b = build_run(tiny_config(root=tmp_path / "b", seed=1), resume=False, log=lambda _m: None)
    assert any(not torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items() if v.is_floating_point())
    xa, xb = next(iter(a.loader)), next(iter(b.loader))
    assert any(not torch.equal(p, q) for p, q in zip(xa.images, xb.images) if p.shape == q.shape) or \
        any(p.shape != q.shape for p, q in zip(xa.images, xb.images))
