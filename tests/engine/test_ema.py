"""Model EMA: the ramped decay, the average against a hand-written recomputation, what
evaluation / export / restore use, and resuming a run that kept no EMA. (Exact resume of the
EMA is in test_resume.py, DDP agreement in test_ddp.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detdistill.engine.checkpoint import load_checkpoint, save_checkpoint
from detdistill.engine.ema import build_ema, ema_decay
from detdistill.engine.restore import restore_model
from detdistill.engine.train import train

pytestmark = pytest.mark.usefixtures("single_thread")


def test_decay_ramps_from_zero_to_the_configured_value() -> None:
    assert ema_decay(1, 0.99, 50) == pytest.approx(0.99 * (1 - math.exp(-1 / 50)))
    assert ema_decay(50, 0.99, 50) == pytest.approx(0.99 * (1 - math.exp(-1)))
    assert ema_decay(10_000, 0.99, 50) == pytest.approx(0.99)
    with pytest.raises(ValueError, match="train.ema_decay"):
        build_ema(nn.Linear(2, 2), decay=1.0)
    with pytest.raises(ValueError, match="train.ema_warmup_steps"):
        build_ema(nn.Linear(2, 2), warmup_steps=0)


def test_average_equals_a_hand_written_recomputation_buffers_included() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = build_ema(model, decay=0.9, warmup_steps=2.0)
    snapshots = []
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 3, 8, 8))  # moves the BatchNorm statistics
        ema.update_parameters(model)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    for name, value in ema.module.state_dict().items():
        if value.dtype == torch.long:  # num_batches_tracked: the latest value
            assert torch.equal(value, snapshots[-1][name])
            continue
        expected = snapshots[0][name].double()  # the first update copies
        for t, snap in enumerate(snapshots[1:], start=2):
            d = 0.9 * (1 - math.exp(-t / 2.0))
            expected = d * expected + (1 - d) * snap[name].double()
        assert torch.allclose(value.double(), expected, atol=1e-6), name
    assert int(ema.n_averaged) == 5


def test_evaluation_export_and_restore_use_the_ema_weights(tmp_path, tiny_config) -> None:
    cfg = tiny_config(train__steps=3, train__ema_decay=0.5, train__ema_warmup_steps=1.0)
    result = train(cfg, resume=False, progress=False, log=lambda _m: None)
    ckpt = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    ema = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    raw = ckpt["model"]
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())  # really an average
    restored = restore_model(cfg.run_dir / "checkpoints" / "last.pt")
    assert restored.weights == "ema"
    for k, v in restored.model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    plain = restore_model(cfg.run_dir / "checkpoints" / "last.pt", weights="raw")
    assert plain.weights == "raw"
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, raw[k]), k
    from safetensors.torch import load_file

    exported = load_file(str(cfg.run_dir / "export" / "model.safetensors"))
    for k, v in exported.items():
        assert torch.equal(v, ema[k]), k
    assert result.final is not None


def test_ema_off_keeps_no_average_and_an_old_checkpoint_resumes_with_a_fresh_one(tmp_path, tiny_config) -> None:
    cfg = tiny_config(train__steps=2, train__ema=False)
    train(cfg, resume=False, progress=False, log=lambda _m: None)
    path = cfg.run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    assert state["ema"] == {}
    restored = restore_model(path)  # no EMA kept: the weights themselves
    assert restored.weights == "raw"
    for k, v in restored.model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    # the same run extended with EMA on: it resumes, says the average starts now, and keeps one
    state.pop("ema")
    save_checkpoint(path, state)
    messages: list[str] = []
    longer = tiny_config(train__steps=3)
    train(longer, resume=True, progress=False, log=messages.append)
    assert any("holds no EMA weights" in m for m in messages), messages
    assert int(load_checkpoint(path)["ema"]["n_averaged"]) == 1
