"""Forward-hook taps: name resolution, DDP transparency, removal, per-step clearing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from detdistill.config import DistillTermConfig
from detdistill.distill.distiller import Distiller, Teacher
from detdistill.taps import FeatureTaps, TapError, TapInfo, resolve_taps
from detdistill.engine.train import train_one_step


def _hooked_modules(model: nn.Module, taps: dict) -> list[nn.Module]:
    return [model.get_submodule(info.module) for info in taps.values()]


# ---------------------------------------------------------------- name resolution
def test_unknown_tap_raises_listing_available_names(adapter, build):
    model = build("fcos")
    available = adapter.taps(model)
    with pytest.raises(TapError) as err:
        resolve_taps(adapter, model, available, ["neck.p3", "neck.p33"], role="student")
    msg = str(err.value)
    assert "'neck.p33'" in msg and "student" in msg
    for name in available:  # every valid name is offered, so a typo is easy to fix
        assert name in msg
    assert isinstance(err.value, KeyError)


def test_raw_module_path_resolves_and_records(adapter, build, batch):
    model = build("fcos")
    infos = resolve_taps(adapter, model, adapter.taps(model), ["backbone.body.layer3", "backbone.layer3"])
    raw = infos["backbone.body.layer3"]
    assert raw.module == "backbone.body.layer3" and raw.key is None
    with FeatureTaps(model, infos) as taps:
        model.train()
        adapter.forward_train(model, batch)
        out = taps.get("backbone.body.layer3")
        assert out.shape == (2, 256, 96 // 16, 128 // 16)
        assert torch.equal(out, taps.get("backbone.layer3"))  # the named tap is the same module


@pytest.mark.parametrize("wrapped_name", ["module.neck.p3", "module.backbone.body.layer2"])
def test_ddp_module_prefix_raises_with_hint(adapter, build, wrapped_name):
    model = build("fcos")
    with pytest.raises(TapError, match="drop the DDP 'module.' prefix"):
        resolve_taps(adapter, model, adapter.taps(model), [wrapped_name], role="teacher")


# ---------------------------------------------------------------- DDP transparency
@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group (FileStore in tmp_path), torn down afterwards."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    assert not dist.is_initialized(), "a process group leaked from another test"
    store = dist.FileStore(str(tmp_path / "pg_store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_taps_record_identically_through_ddp(adapter, build, batch, one_process_group):
    model = build("fcos")
    names = ["neck.p3", "neck.p5", "backbone.layer2", "backbone.body.layer4"]

    def record(m: nn.Module) -> tuple[dict, dict]:
        infos = resolve_taps(adapter, m, adapter.taps(m), names)
        with FeatureTaps(m, infos) as taps:
            m.train()
            losses, _ = adapter.forward_train(m, batch)
            recs = {k: [r.detach().clone() for r in v] for k, v in taps.records.items()}
        return recs, {k: v.detach() for k, v in losses.items()}

    bare_recs, bare_losses = record(model)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    assert adapter.taps(ddp).keys() == adapter.taps(model).keys()
    ddp_recs, ddp_losses = record(ddp)
    assert bare_recs.keys() == ddp_recs.keys()
    for name in names:
        assert len(ddp_recs[name]) == len(bare_recs[name]) == 1, name
        assert ddp_recs[name][0].abs().sum() > 0, name
        assert torch.equal(ddp_recs[name][0], bare_recs[name][0]), name
    for k in bare_losses:
        assert torch.equal(bare_losses[k], ddp_losses[k]), k


def test_distiller_kd_is_the_same_through_ddp(adapter, build, batch, one_process_group):
    """The classic bug: under DDP a hook on ``module.*`` names finds nothing and the KD loss is silently 0."""
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    terms = [DistillTermConfig(method="l2", pairs=[("neck.p3", "neck.p3"), ("backbone.layer3", "backbone.layer3")])]
    distiller = Distiller(student, adapter, terms, Teacher(teacher, adapter))
    student.train()
    bare_kd = distiller(student, batch, 0)["kd/l2"].detach().item()
    ddp = nn.parallel.DistributedDataParallel(student, find_unused_parameters=True)
    ddp_kd = distiller(ddp, batch, 0)["kd/l2"].detach().item()
    assert bare_kd > 0 and math.isfinite(bare_kd)
    assert ddp_kd == pytest.approx(bare_kd, rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------- lifetime of hooks and records
def test_remove_detaches_every_hook(adapter, build, batch):
    model = build("fcos")
    infos = resolve_taps(adapter, model, adapter.taps(model), ["neck.p3", "neck.p4", "backbone.layer2", "backbone.body.layer3"])
    modules = _hooked_modules(model, infos)
    assert all(not m._forward_hooks for m in modules)
    taps = FeatureTaps(model, infos)
    # neck.p3 and neck.p4 share the backbone module: one hook serves both
    assert all(len(m._forward_hooks) == 1 for m in modules)
    model.train()
    adapter.forward_train(model, batch)
    assert all(len(v) == 1 for v in taps.records.values())
    taps.remove()
    assert all(not v for v in taps.records.values())
    assert all(not m._forward_hooks for m in modules)
    adapter.forward_train(model, batch)
    assert all(not v for v in taps.records.values())  # nothing records after remove()


def test_context_manager_removes_hooks(adapter, build, batch):
    model = build("fcos")
    infos = resolve_taps(adapter, model, adapter.taps(model), ["neck.p3"])
    with FeatureTaps(model, infos) as taps:
        assert model.backbone._forward_hooks
    assert not model.backbone._forward_hooks
    model.train()
    adapter.forward_train(model, batch)
    assert taps.records["neck.p3"] == []


def test_get_on_an_unreached_tap_raises(adapter, build):
    model = build("fcos")
    infos = resolve_taps(adapter, model, adapter.taps(model), ["neck.p3"])
    with FeatureTaps(model, infos) as taps, pytest.raises(RuntimeError, match="recorded nothing"):
        taps.get("neck.p3")


def test_module_called_per_level_records_one_entry_per_call(adapter, build, batch):
    model = build("retinanet")
    name = "head.classification_head.conv"  # the shared conv tower, run once per FPN level
    # resolve_taps measures taps with the head-less feature pass, so a head module is
    # refused there (see test_unmeasurable_tap_is_an_error_naming_it); FeatureTaps records any module.
    infos = {name: TapInfo(name, name)}
    with FeatureTaps(model, infos) as taps:
        model.train()
        adapter.forward_train(model, batch)
        recs = taps.records[name]
        assert len(recs) == 5  # p3..p7
        assert [tuple(r.shape[-2:]) for r in recs] == [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
        with pytest.raises(RuntimeError, match="fired 5 times"):
            taps.get(name)


def test_distiller_clears_records_every_step(adapter, build, batch, sgd):
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    terms = [DistillTermConfig(method="pkd", pairs=[("neck.p3", "neck.p3"), ("neck.p4", "neck.p4")])]
    distiller = Distiller(student, adapter, terms, Teacher(teacher, adapter))
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    for step in range(2):
        values = train_one_step(student, adapter, batch, step, optimizer=opt, scheduler=sched, distiller=distiller)
        assert values["loss/kd/pkd"] > 0
        s_taps, t_taps = distiller._student_taps, distiller._teacher_taps
        assert s_taps is not None and t_taps is not None
        assert all(not recs for recs in s_taps.records.values()), f"student tensors kept after step {step}"
        assert all(not recs for recs in t_taps.records.values()), f"teacher tensors kept after step {step}"
    # the hooks stay attached between steps (attached once, not per step) ...
    assert len(student.backbone._forward_hooks) == 1 and len(teacher.backbone._forward_hooks) == 1
    distiller.remove_hooks()  # ... until remove_hooks()
    assert not student.backbone._forward_hooks and not teacher.backbone._forward_hooks
    student.train()
    adapter.forward_train(student, batch)
    assert all(not recs for recs in s_taps.records.values())


def test_student_eval_between_steps_records_nothing(adapter, build, batch, sgd):
    """Periodic evaluation runs the student with the Distiller's hooks still attached: it must
    neither pile up feature maps nor break the next step ('fired N times')."""
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    terms = [DistillTermConfig(method="l2", pairs=[("neck.p3", "neck.p3")])]
    distiller = Distiller(student, adapter, terms, Teacher(teacher, adapter))
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    adapter.predict(student, batch.images)
    adapter.predict(student, batch.images)
    assert all(not recs for recs in distiller._student_taps.records.values())
    values = train_one_step(student, adapter, batch, 1, optimizer=opt, scheduler=sched, distiller=distiller)
    assert values["loss/kd/l2"] > 0 and math.isfinite(values["loss/kd/l2"])


def test_unmeasurable_tap_is_an_error_naming_it(adapter, build):
    """A layer the feature pass never reaches (the head) has no measurable channels: resolving
    it for KD is an error naming the tap, never a connector silently sized from 0."""
    model = build("retinanet")
    with pytest.raises(TapError, match=r"student tap 'head.classification_head.conv'.*cannot tell its channels"):
        resolve_taps(adapter, model, adapter.taps(model), ["head.classification_head.conv"], role="student")


def test_tap_kinds_are_maps_and_token_sequences(adapter, build):
    """The probe tells (N, C, H, W) maps from (N, L, D) token sequences; the adapters' named
    taps are maps with a stride."""
    from detdistill.taps import probe_tap_shapes

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Conv2d(3, 8, 4, stride=4)
            self.encoder = torch.nn.Linear(8, 12)

    class TokenAdapter:
        def forward_features(self, model, images, *, need_head):
            x = model.backbone(torch.stack(images))
            return model.encoder(x.flatten(2).transpose(1, 2))  # (N, L, 12)

    shapes = probe_tap_shapes(TokenAdapter(), Tokens(), {"maps": ("backbone", None), "tokens": ("encoder", None)}, size=64)
    assert shapes == {"maps": (8, 4, "map"), "tokens": (12, 0, "tokens")}
    infos = adapter.taps(build("fcos"))
    assert all(i.kind == "map" and i.channels > 0 and i.stride > 0 for i in infos.values())
