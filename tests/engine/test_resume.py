"""Checkpoints: exact resume, atomic writes, no unpickling of code, NaN stop with a good last.pt."""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import pytest
import torch

from detdistill.adapters.base import get_adapter
from detdistill.engine import checkpoint as ckpt_mod
from detdistill.engine.checkpoint import load_checkpoint, save_checkpoint
from detdistill.engine.train import NonFiniteLossError, train
from detdistill.report.metrics_log import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 6
VOLATILE = {"time", "sec_per_step"}  # wall-clock values differ between any two runs


def _assert_same_tree(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max abs diff {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{where}: {a!r} != {b!r}"


def _train_records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in VOLATILE}
            for r in read_metrics(run_dir) if r["split"] == "train"}


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, tiny_config):
    """Run A: 6 steps straight. Run B: stopped after 3 steps (checkpoint written), then resumed
    to 6. Everything a checkpoint holds must be bitwise identical, and so must the logged
    losses of steps 4-6: data order and augmentation are functions of (seed, step), the RNGs
    are restored, and CPU kernels are deterministic for a fixed thread count.

    The final global RNG state is compared too, though FCOS itself draws no random numbers
    while training: a model that does (Faster R-CNN) is covered by
    :func:`test_resume_is_exact_for_random_models_and_distiller_state`.
    """
    cfg_a = tiny_config(root=tmp_path / "A", train__steps=STEPS)
    cfg_b = tiny_config(root=tmp_path / "B", train__steps=STEPS)

    ra = train(cfg_a, resume=False, progress=False, log=lambda _m: None)
    part = train(cfg_b, resume=True, progress=False, stop_after=3, log=lambda _m: None)
    assert part.steps == 3 and part.final is None
    assert load_checkpoint(cfg_b.run_dir / "checkpoints" / "last.pt")["step"] == 3
    assert not (cfg_b.run_dir / "final_metrics.json").exists()
    messages: list[str] = []
    rb = train(cfg_b, resume=True, progress=False, log=messages.append)
    assert any("resumed from" in m and "step 3" in m for m in messages), messages
    assert ra.steps == rb.steps == STEPS

    a = load_checkpoint(cfg_a.run_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(cfg_b.run_dir / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == STEPS
    _assert_same_tree(a["model"], b["model"], "model")
    _assert_same_tree(a["ema"], b["ema"], "ema")  # the average resumes too (train.ema is on by default)
    assert int(a["ema"]["n_averaged"]) == STEPS
    _assert_same_tree(a["optimizer"], b["optimizer"], "optimizer")
    _assert_same_tree(a["scheduler"], b["scheduler"], "scheduler")
    _assert_same_tree(a["rng"], b["rng"], "rng")
    # momentum buffers exist, so the optimizer comparison was not vacuous
    assert any("momentum_buffer" in s for s in a["optimizer"]["state"].values())

    la, lb = _train_records(cfg_a.run_dir), _train_records(cfg_b.run_dir)
    assert sorted(la) == list(range(1, STEPS + 1)) and sorted(lb) == list(range(1, STEPS + 1))
    for step in (4, 5, 6):
        assert la[step] == lb[step], f"step {step}: {la[step]} vs {lb[step]}"
    assert ra.final is not None and rb.final is not None
    assert ra.final.as_dict() == pytest.approx(rb.final.as_dict(), nan_ok=True)


def test_rerunning_a_finished_run_keeps_its_recorded_timing(tmp_path, tiny_config):
    """``train`` on a finished run only scores it again: the time per step it reports and the
    run's ``run_summary.json`` are the training's, not the 0 s of a call that ran no step (a
    rerun quickstart printed 0.0 s/step for its teacher and overwrote the summary)."""
    cfg = tiny_config(root=tmp_path, train__steps=2)
    first = train(cfg, resume=False, progress=False, log=lambda _m: None)
    summary = (cfg.run_dir / "run_summary.json").read_text()
    assert first.sec_per_step > 0
    again = train(cfg, resume=True, progress=False, log=lambda _m: None)
    assert (cfg.run_dir / "run_summary.json").read_text() == summary
    assert again.sec_per_step == pytest.approx(first.sec_per_step) and again.seconds == pytest.approx(first.seconds)
    assert again.final is not None and first.final is not None
    assert again.final.as_dict() == pytest.approx(first.final.as_dict(), nan_ok=True)


def _teacher_checkpoint(tiny_config, root: Path) -> Path:
    """A 1-step FCOS teacher with a 64-wide FPN (the tiny student's is 32: a real connector)."""
    cfg = tiny_config(root=root, name="teacher", model__fpn_channels=64, train__steps=1)
    train(cfg, resume=False, progress=False, log=lambda _m: None)
    return cfg.run_dir / "checkpoints" / "last.pt"


@pytest.mark.parametrize("case", ["fasterrcnn", "kd_connector", "scalekd_adam_assistant"])
def test_resume_is_exact_for_random_models_and_distiller_state(tmp_path, tiny_config, case):
    """Interrupted-and-resumed equals uninterrupted where the plain FCOS run cannot tell:

    - ``fasterrcnn``: its RPN/ROI box samplers draw from the global torch RNG every step, so
      a resume that does not restore the RNG state gives different weights;
    - ``kd_connector``: an L2 term through a trainable 32->64 connector, whose weights and
      momentum live in the Distiller (not the model) and must come back on resume;
    - ``scalekd_adam_assistant``: ScaleKD's assistant trains with Adam beside the SGD student
      (an ``OptimizerChain``): both optimizers' moments must come back.
    """
    over: dict = {"train__steps": STEPS}
    if case == "fasterrcnn":
        over["model__arch"] = "fasterrcnn"
    else:
        ckpt = _teacher_checkpoint(tiny_config, tmp_path / "T")
        over["teacher"] = {"checkpoint": str(ckpt)}
        over["distill"] = [{"method": "l2", "pairs": [["neck.p3", "neck.p3"], ["neck.p4", "neck.p4"]]}]
        if case == "scalekd_adam_assistant":
            over["distill"] = [{"method": "scalekd", "pairs": [[f"neck.p{i}"] * 2 for i in (3, 4, 5, 6, 7)],
                                "params": {"csa_start": 1, "freeze_backbone_steps": 2}}]
    cfg_a = tiny_config(root=tmp_path / "A", **over)
    cfg_b = tiny_config(root=tmp_path / "B", **over)
    train(cfg_a, resume=False, progress=False, log=lambda _m: None)
    train(cfg_b, resume=True, progress=False, stop_after=3, log=lambda _m: None)
    train(cfg_b, resume=True, progress=False, log=lambda _m: None)

    a = load_checkpoint(cfg_a.run_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(cfg_b.run_dir / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == STEPS
    for key in ("model", "distiller", "optimizer", "rng"):
        _assert_same_tree(a[key], b[key], key)
    if case == "kd_connector":
        assert any("connectors" in k for k in a["distiller"]), sorted(a["distiller"])
        # the connector trained: it is not at its initial weights (which a fresh one would share)
        fresh = tiny_config(root=tmp_path / "C", **{**over, "train__steps": 1})
        train(fresh, resume=False, progress=False, stop_after=0, log=lambda _m: None)
        c = load_checkpoint(fresh.run_dir / "checkpoints" / "last.pt")
        assert any(not torch.equal(a["distiller"][k], c["distiller"][k]) for k in a["distiller"])
    if case == "scalekd_adam_assistant":
        sgd, adam = a["optimizer"]["optimizers"]
        assert any("momentum_buffer" in s for s in sgd["state"].values())
        assert adam["state"] and all("exp_avg_sq" in s for s in adam["state"].values())
    la, lb = _train_records(cfg_a.run_dir), _train_records(cfg_b.run_dir)
    for step in (4, 5, 6):
        assert la[step] == lb[step], f"step {step}: {la[step]} vs {lb[step]}"


def test_mid_run_evaluation_leaves_training_unchanged(tmp_path, tiny_config):
    """Evaluating every 2 steps must not change what trains: same weights, average, RNG state and
    logged losses as the run that never evaluates mid-run. Faster R-CNN draws from the global RNG
    every training step, so an evaluation that drew a number (or left the model in eval mode, or
    updated batch-norm statistics) would show. This is what lets a bench drop or add mid-run
    evaluations without breaking the pairing of its runs by seed."""
    over = {"train__steps": 4, "model__arch": "fasterrcnn"}
    cfg_a = tiny_config(root=tmp_path / "A", train__eval_every=2, **over)
    cfg_b = tiny_config(root=tmp_path / "B", train__eval_every=0, **over)
    train(cfg_a, resume=False, progress=False, log=lambda _m: None)
    train(cfg_b, resume=False, progress=False, log=lambda _m: None)
    assert any(r["split"] == "eval" and r["step"] == 2 for r in read_metrics(cfg_a.run_dir)), "no mid-run evaluation ran"
    assert not any(r["split"] == "eval" and r["step"] == 2 for r in read_metrics(cfg_b.run_dir))
    a = load_checkpoint(cfg_a.run_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(cfg_b.run_dir / "checkpoints" / "last.pt")
    for key in ("model", "ema", "optimizer", "rng"):
        _assert_same_tree(a[key], b[key], key)
    assert _train_records(cfg_a.run_dir) == _train_records(cfg_b.run_dir)


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(4.0)})
    save_checkpoint(path, {"step": 2, "w": torch.arange(8.0)})  # over an existing file
    assert load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary left

    def broken_save(obj, f, *args, **kwargs):  # writes half a file, then the "disk" fails
        f.write(b"PK\x03\x04 partial checkpoint bytes")
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, {"step": 3, "w": torch.zeros(2)})
    monkeypatch.undo()
    old = load_checkpoint(path)
    assert old["step"] == 2 and torch.equal(old["w"], torch.arange(8.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


class _Payload:
    """Unpickling this runs ``Path.touch(marker)``: code execution on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "code_ran"
    bad = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Payload(marker)}, bad)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(bad)
    assert not marker.exists(), "load_checkpoint executed pickled code"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload does run when unpickled unsafely
    assert marker.exists()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_nan_loss_stops_with_step_and_term_and_keeps_last_good_checkpoint(tmp_path, tiny_config, monkeypatch):
    cfg = tiny_config(train__steps=5, train__ckpt_every=1)
    adapter = get_adapter(cfg.model.framework)
    real = adapter.forward_train
    calls = {"n": 0}

    def forward_train(model, batch, **kwargs):
        losses, raw = real(model, batch, **kwargs)
        step = calls["n"]  # one call per step, from step 0
        calls["n"] += 1
        if step == 2:
            losses["bbox_regression"] = losses["bbox_regression"] * float("nan")
        return losses, raw

    monkeypatch.setattr(adapter, "forward_train", forward_train)
    last = cfg.run_dir / "checkpoints" / "last.pt"
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, resume=False, progress=False, log=lambda _m: None)
    msg = str(info.value)
    assert "step 2" in msg and "bbox_regression" in msg, msg
    assert "classification" not in msg.split("Last good")[0], msg  # only the bad term is named
    assert str(last) in msg
    state = load_checkpoint(last)
    assert state["step"] == 2  # written after steps 0 and 1; step 2 never touched the weights
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not list(last.parent.glob("*.tmp"))
    assert not (cfg.run_dir / "final_metrics.json").exists()


def test_an_optimizer_state_of_another_shape_is_refused_naming_the_checkpoint(tmp_path, tiny_config):
    """A checkpoint whose optimizer state has another layout (here a two-optimizer chain's, as
    ScaleKD writes now, where the run has one SGD) is refused with its path, not a KeyError."""
    cfg = tiny_config(root=tmp_path, train__steps=2)
    train(cfg, resume=False, progress=False, stop_after=1, log=lambda _m: None)
    path = cfg.run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    state["optimizer"] = {"optimizers": [state["optimizer"], state["optimizer"]]}
    save_checkpoint(path, state)
    with pytest.raises(ValueError, match=rf"the checkpoint {re.escape(str(path))} holds optimizer state that does not fit.*--fresh"):
        train(cfg, resume=True, progress=False, log=lambda _m: None)
