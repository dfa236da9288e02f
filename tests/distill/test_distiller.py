"""Distiller invariants: frozen teacher, where gradients go, per-term logging, warmup, errors,
how far the teacher runs, heterogeneous pairs, teacher input scale, MSSD self-distillation."""

from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from detdistill.config import DistillTermConfig
from detdistill.distill.connectors import Connector
from detdistill.distill.methods.feature import connector_key
from detdistill.distill.distiller import Distiller, Teacher
from detdistill.distill.methods import METHODS
from detdistill.engine.train import train_one_step

# methods that run on the FCOS pair here; those that need a DETR side run in test_detr_distill.py
TEACHER_METHODS = [n for n in METHODS.names() if METHODS.get(n).family != "self"
                   and METHODS.get(n).student_requires is None and METHODS.get(n).teacher_requires is None]
FEATURE_PAIRS = [("neck.p3", "neck.p3"), ("neck.p4", "neck.p4")]
MSSD_PAIRS = [(f"fpn.p{lvl}", f"pan.p{lvl}") for lvl in (3, 4, 5)]
HEAD_LEVELS = [(f"neck.p{lvl}", f"neck.p{lvl}") for lvl in (3, 4, 5, 6, 7)]


def _pairs(method: str) -> list[tuple[str, str]]:
    """Pairs a method needs on the FCOS pair: feature maps to imitate, or (ScaleKD) every head level."""
    family = METHODS.get(method).family
    return {"feature": FEATURE_PAIRS, "scale": HEAD_LEVELS}.get(family, [])


def _term(method: str, **kw) -> DistillTermConfig:
    return DistillTermConfig(method=method, pairs=kw.pop("pairs", _pairs(method)), **kw)


def _connectors(distiller: Distiller) -> list[Connector]:
    """Every connector of every method, in build order."""
    return [m for m in distiller.modules() if isinstance(m, Connector)]


def _connector(distiller: Distiller, label: str, s: str, t: str) -> Connector:
    return distiller.method(label).connectors[connector_key(s, t)]


def _nonzero(g: Tensor | None) -> bool:
    return g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0)


def _kd_values(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if k.startswith("loss/kd/")}


def _assert_positive_finite(values: dict[str, float], key: str) -> None:
    assert key in values, f"{key} not logged; got {sorted(values)}"
    assert math.isfinite(values[key]) and values[key] > 0, f"{key}={values[key]}"


def _capture_output_shapes(module: nn.Module, store: list) -> object:
    return module.register_forward_hook(lambda _m, inp, out: store.append((tuple(inp[0].shape), tuple(out.shape))))


@pytest.fixture(scope="module")
def pair(build):
    """A read-only FCOS student (FPN 32) and FCOS teacher (FPN 64), for construction-time checks."""
    return build("fcos"), build("fcos", fpn=64, seed=1)


# ---------------------------------------------------------------- invariants of one step, per method
@pytest.mark.parametrize("method", TEACHER_METHODS)
def test_one_step_invariants(method, adapter, build, batch, sgd):
    family = METHODS.get(method).family
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    teacher.train()  # the Distiller itself must freeze it
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert any("running_mean" in k for k in before)  # BN running stats are part of the check

    distiller = Distiller(student, adapter, [_term(method)], Teacher(teacher, adapter))
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    conn_params = [p for c in _connectors(distiller) for p in c.parameters()]
    if family == "feature":  # 32 -> 64 channels: one 1x1 conv per pair
        assert len(_connectors(distiller)) == len(FEATURE_PAIRS) and conn_params
    elif family == "scale":  # ScaleKD's SDF dimension adapter (identity: both R18 layer4s have 512 channels)
        assert len(_connectors(distiller)) == 1
    else:
        assert not conn_params

    # The KD term alone (all its parts) sends gradient to the student and to every connector parameter.
    student.train()
    kd = sum(v for k, v in distiller(student, batch, 0).items() if k.startswith(f"kd/{method}"))
    s_params = list(student.parameters())
    grads = torch.autograd.grad(kd, s_params + conn_params, allow_unused=True)
    assert any(_nonzero(g) for g in grads[: len(s_params)]), "KD gradient does not reach the student"
    assert all(_nonzero(g) for g in grads[len(s_params):]), "KD gradient does not reach every connector parameter"

    opt, sched = sgd(s_params + list(distiller.parameters()))
    s_before = [p.detach().clone() for p in s_params]
    values = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)

    parts = set(_kd_values(values))
    assert parts and all(k == f"loss/kd/{method}" or k.startswith(f"loss/kd/{method}/") for k in parts), parts
    for key in parts:
        _assert_positive_finite(values, key)
    assert all(math.isfinite(v) for v in values.values())
    assert any(not torch.equal(a, p) for a, p in zip(s_before, s_params)), "the student did not move"

    after = teacher.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"teacher state changed: {changed}"
    assert all(p.grad is None for p in teacher.parameters())
    assert all(_nonzero(p.grad) for p in conn_params)


def test_terms_are_logged_separately_and_summed(adapter, build, batch, sgd):
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    terms = [DistillTermConfig(method="pkd", name="pkd_p3", pairs=[("neck.p3", "neck.p3")], weight=10.0),
             DistillTermConfig(method="l2", name="l2_p4", pairs=[("neck.p4", "neck.p4")], weight=1.0),
             DistillTermConfig(method="kl", name="kl_logits", weight=1.0)]
    distiller = Distiller(student, adapter, terms, Teacher(teacher, adapter))
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    values = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    assert set(_kd_values(values)) == {"loss/kd/pkd_p3", "loss/kd/l2_p4", "loss/kd/kl_logits"}
    for key in _kd_values(values):
        _assert_positive_finite(values, key)
    parts = sum(v for k, v in values.items() if k.startswith("loss/"))
    assert values["loss"] == pytest.approx(parts, rel=1e-5)


def test_warmup_scales_the_weight_linearly(adapter, build, batch, sgd):
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    term = DistillTermConfig(method="l2", pairs=[("neck.p3", "neck.p3")], weight=2.0, warmup_steps=10)
    distiller = Distiller(student, adapter, [term], Teacher(teacher, adapter))
    assert [distiller.weight(term, s) for s in (0, 5, 10, 20)] == [0.0, 1.0, 2.0, 2.0]
    # lr 0: the weights do not move, so the raw loss is the same at every step and only w(step) varies
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()), lr=0.0)
    logged = {s: train_one_step(student, adapter, batch, s, optimizer=opt, scheduler=sched, distiller=distiller)["loss/kd/l2"]
              for s in (0, 5, 10, 20)}
    assert logged[0] == 0.0
    full = logged[20]
    assert full > 0 and math.isfinite(full)
    assert logged[5] / full == pytest.approx(0.5, rel=1e-5)
    assert logged[10] / full == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("method", TEACHER_METHODS)
def test_term_needing_a_teacher_without_one_raises(method, adapter, pair):
    student, _ = pair
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(student, adapter, [_term(method)], teacher=None)


@pytest.mark.parametrize("method", METHODS.names())
def test_unknown_params_raise_naming_the_allowed_ones(method, adapter, build, pair):
    cls = METHODS.get(method)
    extra = {"channels", "num_scales", "strides"} if cls.family == "self" else set()  # filled in by the method
    allowed = [p for p in inspect.signature(cls.params_signature()).parameters
               if p not in ("self", "ctx", "args", "kwargs") and p not in extra]
    if cls.family == "self":
        student, teacher, pairs = build("yolo_pafpn"), None, MSSD_PAIRS
    else:
        (student, t_model), pairs = pair, _pairs(method)
        teacher = Teacher(t_model, adapter)
    term = DistillTermConfig(method=method, pairs=pairs, params={"no_such_param": 1})
    with pytest.raises(ValueError) as err:
        Distiller(student, adapter, [term], teacher)
    msg = str(err.value)
    assert repr(method) in msg and "no_such_param" in msg
    for name in allowed:
        assert name in msg, f"allowed param {name!r} missing from: {msg}"
    for name in extra:
        assert name not in msg.split("allowed:")[-1]


def test_known_params_reach_the_loss(adapter, pair):
    student, teacher = pair
    distiller = Distiller(student, adapter, [_term("pkd", params={"eps": 1e-4}), _term("kl", params={"temperature": 2.0})],
                          Teacher(teacher, adapter))
    assert distiller.method("pkd").loss_fn.eps == 1e-4
    assert distiller.method("kl").loss_fn.temperature == 2.0


def test_connector_none_with_different_channels_raises(adapter, pair):
    student, teacher = pair
    with pytest.raises(ValueError, match=r"channels differ \(32 vs 64\)"):
        Distiller(student, adapter, [_term("l2", connector="none")], Teacher(teacher, adapter))


def test_unknown_tap_in_a_term_raises(adapter, pair):
    student, teacher = pair
    with pytest.raises(KeyError, match="teacher has no tap 'neck.p9'"):
        Distiller(student, adapter, [_term("l2", pairs=[("neck.p3", "neck.p9")])], Teacher(teacher, adapter))


def test_raw_module_paths_work_in_feature_terms(adapter, build, batch):
    """``detdistill list`` advertises raw module paths as taps: their channels are probed."""
    student, teacher = build("fcos"), build("fcos", backbone="resnet50", fpn=64, seed=1)
    term = _term("l2", pairs=[("backbone.body.layer3", "backbone.body.layer3")])
    distiller = Distiller(student, adapter, [term], Teacher(teacher, adapter))
    info_s, info_t = distiller.s_info["backbone.body.layer3"], distiller.t_info["backbone.body.layer3"]
    assert (info_s.channels, info_s.stride, info_t.channels, info_t.stride) == (256, 16, 1024, 16)
    conn = _connectors(distiller)[0]
    assert (conn.proj.in_channels, conn.proj.out_channels) == (256, 1024)
    student.train()
    kd = distiller(student, batch, 0)["kd/l2"]
    assert torch.isfinite(kd) and kd > 0


def test_logit_kd_between_different_head_layouts_raises_at_build(adapter, build, batch):
    """RetinaNet (9 anchors per location) against FCOS (1 point): refused when the Distiller is
    built, with both layouts, before any data or training step."""
    student, teacher = build("retinanet"), build("fcos", seed=1)
    with pytest.raises(ValueError) as err:
        Distiller(student, adapter, [_term("kl")], Teacher(teacher, adapter))
    msg = str(err.value)
    # 256 px: 32*32 + 16*16 + 8*8 + 4*4 + 2*2 = 1364 locations; 3 classes
    assert "(12276, 3)" in msg and "(1364, 3)" in msg and "head layout" in msg
    # the same pair with the teacher at another input scale is refused too
    other = build("fcos", seed=2)
    with pytest.raises(ValueError, match=r"input scale 2.0"):
        Distiller(build("fcos"), adapter, [_term("kl")], Teacher(other, adapter, input_scale=2.0))


def test_logit_kd_runtime_check_still_names_both_shapes(adapter, build, batch):
    """Images of another size than the build probe's still fail clearly at the step."""
    student, teacher = build("fcos"), build("fcos", seed=1)
    distiller = Distiller(student, adapter, [_term("kl")], Teacher(teacher, adapter))
    distiller.teacher.input_scale = 0.5  # changed after the build check
    student.train()
    with pytest.raises(ValueError, match="head layout"):
        distiller(student, batch, 0)


def test_logit_kd_with_a_two_stage_teacher_raises(adapter, build, batch):
    student, teacher = build("fcos"), build("fasterrcnn", seed=1)
    with pytest.raises(ValueError, match="no dense head"):
        Distiller(student, adapter, [_term("kl")], Teacher(teacher, adapter))


# ---------------------------------------------------------------- the teacher runs only as far as needed
@pytest.mark.parametrize("methods,head_calls", [(["l2"], 0), (["pkd", "ssim"], 0), (["kl"], 1), (["l2", "kl"], 1)])
def test_teacher_head_runs_only_for_logit_terms(methods, head_calls, adapter, build, batch):
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    distiller = Distiller(student, adapter, [_term(m) for m in methods], Teacher(teacher, adapter))
    calls = {"teacher": 0, "student": 0}
    hooks = [m.register_forward_hook(lambda *_a, who=who: calls.__setitem__(who, calls[who] + 1))
             for who, m in (("teacher", teacher.head), ("student", student.head))]
    student.train()
    try:
        losses = distiller(student, batch, 0)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"teacher": head_calls, "student": 1}
    assert all(torch.isfinite(losses[f"kd/{m}"]) and losses[f"kd/{m}"] > 0 for m in methods)


# ---------------------------------------------------------------- heterogeneous teacher/student pairs
def test_fasterrcnn_r50_teacher_to_retinanet_r18_student(adapter, build, batch, sgd):
    teacher = build("fasterrcnn", backbone="resnet50", fpn=64, seed=1)
    student = build("retinanet", fpn=32)
    terms = [DistillTermConfig(method="pkd", pairs=[(f"neck.p{lvl}", f"neck.p{lvl}") for lvl in (3, 4, 5)], weight=10.0),
             DistillTermConfig(method="l2", name="cross_stride", pairs=[("neck.p4", "neck.p3")])]
    distiller = Distiller(student, adapter, terms, Teacher(teacher, adapter))
    assert len(_connectors(distiller)) == 4
    for conn in _connectors(distiller):
        assert conn.mode == "conv1x1" and (conn.proj.in_channels, conn.proj.out_channels) == (32, 64)
    cross = _connector(distiller, "cross_stride", "neck.p4", "neck.p3")
    seen: list = []
    handle = _capture_output_shapes(cross, seen)
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    try:
        values = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    finally:
        handle.remove()
    # student p4 (stride 16) is projected to 64 channels and resized to teacher p3 (stride 8)
    assert seen == [((2, 32, 6, 8), (2, 64, 12, 16))]
    _assert_positive_finite(values, "loss/kd/pkd")
    _assert_positive_finite(values, "loss/kd/cross_stride")
    assert math.isfinite(values["loss"])


def _numpy_pkd(student_map: np.ndarray, teacher_map: np.ndarray) -> float:
    """1 - Pearson r per channel (over batch and space), averaged over channels."""
    rs = [np.corrcoef(student_map[:, c].ravel(), teacher_map[:, c].ravel())[0, 1] for c in range(teacher_map.shape[1])]
    return float(np.mean(1.0 - np.asarray(rs)))


def test_fcos_teacher_to_retinanet_student_with_pkd(adapter, build, batch, sgd):
    """The logged PKD term equals 10 * sum over P3-P7 of (1 - numpy Pearson r), computed on the
    FPN maps taken by hooks of this test and the connectors as they were before the step."""
    teacher, student = build("fcos", fpn=64, seed=1), build("retinanet", fpn=32)
    term = DistillTermConfig(method="pkd", pairs=[(f"neck.p{lvl}", f"neck.p{lvl}") for lvl in (3, 4, 5, 6, 7)], weight=10.0)
    distiller = Distiller(student, adapter, [term], Teacher(teacher, adapter))
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    for step in range(2):
        maps: dict[str, list[Tensor]] = {}
        hooks = [m.backbone.register_forward_hook(lambda _m, _i, out, who=who: maps.__setitem__(who, [v.detach() for v in out.values()]))
                 for who, m in (("s", student), ("t", teacher))]
        connectors = copy.deepcopy(distiller.method("pkd").connectors)  # the step updates them
        try:
            values = train_one_step(student, adapter, batch, step, optimizer=opt, scheduler=sched, distiller=distiller)
        finally:
            for h in hooks:
                h.remove()
        assert len(maps["s"]) == len(maps["t"]) == 5
        expected = 0.0
        with torch.no_grad():
            for lvl, (s_map, t_map) in enumerate(zip(maps["s"], maps["t"]), start=3):
                proj = connectors[connector_key(f"neck.p{lvl}", f"neck.p{lvl}")](s_map, t_map.shape[-2:])
                expected += _numpy_pkd(proj.double().numpy(), t_map.double().numpy())
        assert 0.5 < expected / 5 < 1.5  # random nets: weakly correlated maps, a non-trivial value
        assert values["loss/kd/pkd"] == pytest.approx(10.0 * expected, rel=1e-4), f"step {step}"


def test_teacher_sees_a_larger_input(adapter, build, batch, sgd):
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    term = DistillTermConfig(method="pkd", pairs=[(f"neck.p{lvl}", f"neck.p{lvl}") for lvl in (3, 4, 5)], weight=10.0)
    distiller = Distiller(student, adapter, [term], Teacher(teacher, adapter, input_scale=2.0))
    teacher_inputs: list = []
    conn_shapes: list = []
    hooks = [teacher.backbone.register_forward_pre_hook(lambda _m, inp: teacher_inputs.append(tuple(inp[0].shape))),
             _capture_output_shapes(_connector(distiller, "pkd", "neck.p3", "neck.p3"), conn_shapes)]
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    try:
        values = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    finally:
        for h in hooks:
            h.remove()
    assert teacher_inputs == [(2, 3, 2 * 96, 2 * 128)]
    assert conn_shapes == [((2, 32, 12, 16), (2, 64, 24, 32))]  # resized up to the teacher's p3
    _assert_positive_finite(values, "loss/kd/pkd")


def test_identical_student_gives_zero_feature_loss(adapter, build, batch):
    teacher = build("fcos", norm="gn", seed=3)  # GroupNorm: train and eval mode compute the same maps
    student = copy.deepcopy(teacher)
    pairs = [(f"neck.p{lvl}", f"neck.p{lvl}") for lvl in (3, 4, 5)]
    terms = [DistillTermConfig(method="pkd", pairs=pairs, connector="none", weight=10.0),
             DistillTermConfig(method="l2", pairs=pairs, connector="none")]
    distiller = Distiller(student, adapter, terms, Teacher(teacher, adapter))
    assert all(isinstance(c.proj, nn.Identity) for c in _connectors(distiller))
    student.train()
    losses = distiller(student, batch, 0)
    assert losses["kd/pkd"].abs() < 1e-4
    assert losses["kd/l2"].abs() < 1e-10
    # control: a differently initialised student of the same architecture is far from the teacher
    other = build("fcos", norm="gn", seed=4)
    other_d = Distiller(other, adapter, terms, Teacher(teacher, adapter))
    other.train()
    assert other_d(other, batch, 0)["kd/pkd"] > 0.5


# ---------------------------------------------------------------- MSSD (teacher-free)
def test_mssd_through_the_distiller(adapter, build, batch, sgd):
    student = build("yolo_pafpn")
    plain_keys = list(build("yolo_pafpn").state_dict().keys())
    distiller = Distiller(student, adapter, [DistillTermConfig(method="mssd", pairs=MSSD_PAIRS)], teacher=None)
    assert distiller.teacher is None and not _connectors(distiller)
    loss_mod = distiller.method("mssd").loss_fn
    assert loss_mod.strides == (8, 16, 32)
    # the adaptation layers belong to the Distiller, not to the (exported) student
    student_ids = {id(p) for p in student.parameters()}
    adapter_params = list(loss_mod.adapters.parameters())
    assert adapter_params and not any(id(p) in student_ids for p in distiller.parameters())
    assert {id(p) for p in adapter_params} <= {id(p) for p in distiller.parameters()}
    assert any(k.startswith("methods.mssd.loss_fn.adapters.") for k in distiller.state_dict())
    assert list(student.state_dict().keys()) == plain_keys

    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    values = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    assert set(_kd_values(values)) == {"loss/kd/mssd/mssd_self", "loss/kd/mssd/mssd_mask"}
    _assert_positive_finite(values, "loss/kd/mssd/mssd_self")
    _assert_positive_finite(values, "loss/kd/mssd/mssd_mask")
    assert all(_nonzero(p.grad) for p in adapter_params)
    assert list(student.state_dict().keys()) == plain_keys


def test_mssd_mask_weight_zero_turns_the_mask_term_off(adapter, build, batch, sgd):
    """``mask_weight: 0`` (the self-only ablation) is no logged zero loss, which training would
    flag as a silent term: the mask part is gone, the self part is the one a weighted run has."""
    student = build("yolo_pafpn")
    off = Distiller(student, adapter, [DistillTermConfig(method="mssd", pairs=MSSD_PAIRS, params={"mask_weight": 0.0})],
                    teacher=None)
    on = Distiller(student, adapter, [DistillTermConfig(method="mssd", pairs=MSSD_PAIRS, params={"mask_weight": 1.0})],
                   teacher=None)
    assert off.method("mssd").part_names == ("mssd_self",)
    student.train()
    with torch.no_grad():
        off_losses, on_losses = off(student, batch, 0), on(student, batch, 0)
    kd = lambda losses: {k for k in losses if k.startswith("kd/")}  # noqa: E731
    assert kd(off_losses) == {"kd/mssd/mssd_self"} and kd(on_losses) == {"kd/mssd/mssd_self", "kd/mssd/mssd_mask"}
    torch.testing.assert_close(off_losses["kd/mssd/mssd_self"], on_losses["kd/mssd/mssd_self"], rtol=0, atol=0)
    opt, sched = sgd(list(student.parameters()) + list(off.parameters()))
    values = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=off)
    assert set(_kd_values(values)) == {"loss/kd/mssd/mssd_self"}
    _assert_positive_finite(values, "loss/kd/mssd/mssd_self")
    assert all(p.grad is None for p in off.method("mssd").loss_fn.adapters.parameters())  # nothing runs them


def test_mssd_terms_through_the_distiller_equal_the_loss_on_hooked_maps(adapter, build, batch):
    """The Distiller feeds MSSDLoss the FPN/PAN maps, the boxes and the padded input size:
    its (weighted) terms equal the loss module applied to maps this test hooks itself,
    with ``mask_weight`` and the term weight both applied."""
    student = build("yolo_pafpn")
    term = DistillTermConfig(method="mssd", pairs=MSSD_PAIRS, weight=0.5, params={"mask_weight": 3.0})
    distiller = Distiller(student, adapter, [term], teacher=None)
    neck = student.backbone.neck
    maps: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, k=f"{g}{i}": maps.__setitem__(k, out.detach()))
             for g in ("fpn", "pan") for i, m in enumerate(getattr(neck, f"{g}_outs"))]
    student.train()
    try:
        with torch.no_grad():
            losses = distiller(student, batch, 0)
    finally:
        for h in hooks:
            h.remove()
    loss = distiller.method("mssd").loss_fn
    assert loss.mask_weight == 3.0
    with torch.no_grad():
        want = loss([maps[f"fpn{i}"] for i in range(3)], [maps[f"pan{i}"] for i in range(3)],
                    [t.boxes for t in batch.targets], tuple(batch.images[0].shape[-2:]))  # 96x128: no padding
    for part in ("mssd_self", "mssd_mask"):
        assert float(want[part]) > 0
        torch.testing.assert_close(losses[f"kd/mssd/{part}"], 0.5 * want[part])


def test_mssd_self_term_sends_no_gradient_to_the_fpn_side(adapter, build, batch):
    """Isolate the FPN maps' role as *teachers*: the network path from each FPN map into the
    PAN path is cut (a later forward hook hands the rest of the network a detached copy), so
    the only link from ``mssd_self`` to the FPN modules and the backbone is the recorded FPN
    map that the loss uses as its target. That link must carry no gradient."""
    student = build("yolo_pafpn")
    distiller = Distiller(student, adapter, [DistillTermConfig(method="mssd", pairs=MSSD_PAIRS)], teacher=None)
    student.train()
    distiller(student, batch, 0)  # attaches the Distiller's hooks (lazily, once)
    neck = student.backbone.neck
    captured: list[Tensor] = []

    def cut(_m: nn.Module, _i: object, out: Tensor) -> Tensor:
        captured.append(out)  # the graph-connected map, as the taps recorded it
        return out.detach()

    hooks = [m.register_forward_hook(cut) for m in neck.fpn_outs]  # run after the taps' hooks
    try:
        losses = distiller(student, batch, 1)
    finally:
        for h in hooks:
            h.remove()
    self_term = losses["kd/mssd/mssd_self"]
    assert self_term > 0 and len(captured) == 3 and all(c.requires_grad for c in captured)

    fpn_side = list(neck.fpn_outs.parameters()) + list(student.backbone.body.parameters())
    grads = torch.autograd.grad(self_term, fpn_side, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads), "mssd_self trains the FPN (teacher) side"
    # controls: the captured maps do depend on those parameters, and mssd_self does train the PAN side
    ctrl = torch.autograd.grad(sum(c.sum() for c in captured), list(neck.fpn_outs.parameters()), allow_unused=True,
                               retain_graph=True)
    assert any(_nonzero(g) for g in ctrl)
    pan = torch.autograd.grad(self_term, list(neck.pan_outs.parameters()), allow_unused=True)
    assert any(_nonzero(g) for g in pan)


def test_mssd_term_needs_equal_known_channels(adapter, build):
    student = build("yolo_pafpn")
    term = DistillTermConfig(method="mssd", pairs=[("backbone.layer2", "pan.p3"), ("fpn.p4", "pan.p4"), ("fpn.p5", "pan.p5")])
    with pytest.raises(ValueError, match="equal, known channels"):
        Distiller(student, adapter, [term], teacher=None)


def test_connector_module_is_the_distillers(adapter, pair):
    student, teacher = pair
    distiller = Distiller(student, adapter, [_term("l2")], Teacher(teacher, adapter))
    assert _connectors(distiller)
    student_ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in student_ids for p in distiller.parameters())


def test_normalize_scales_a_term_to_the_task_loss_once_and_checkpoints_the_factor(adapter, build, batch_maker, sgd):
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    term = _term("pkd", weight=0.5, normalize=True)
    distiller = Distiller(student, adapter, [term], Teacher(teacher, adapter))
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    first = train_one_step(student, adapter, batch_maker(seed=0), 0, optimizer=opt, scheduler=sched, distiller=distiller)
    task = sum(v for k, v in first.items() if k.startswith("loss/") and not k.startswith("loss/kd/"))
    assert first["loss/kd/pkd"] == pytest.approx(0.5 * task, rel=1e-5)  # weight 0.5 x the task loss at the start
    scale = float(distiller.kd_scales[0])
    assert math.isfinite(scale) and scale > 0
    second = train_one_step(student, adapter, batch_maker(seed=1), 1, optimizer=opt, scheduler=sched, distiller=distiller)
    assert float(distiller.kd_scales[0]) == scale  # measured once, then fixed
    task2 = sum(v for k, v in second.items() if k.startswith("loss/") and not k.startswith("loss/kd/"))
    assert second["loss/kd/pkd"] != pytest.approx(0.5 * task2, rel=1e-3)  # not re-normalised every step
    assert "kd_scales" in distiller.state_dict()  # resumes with the same factor
    distiller.remove_hooks()
    plain = Distiller(student, adapter, [_term("pkd")], Teacher(teacher, adapter))
    assert "kd_scales" not in plain.state_dict()  # old checkpoints keep loading
    plain.remove_hooks()


def test_parts_other_than_the_declared_ones_raise_naming_the_term(adapter, build, batch_maker, sgd):
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    distiller = Distiller(student, adapter, [_term("pkd", name="pkd_fpn")], Teacher(teacher, adapter))
    distiller.method("pkd_fpn").part_names = ("feat",)  # a method whose forward and declaration disagree
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    with pytest.raises(RuntimeError, match=r"'pkd_fpn' \(pkd\) returned parts \[''\], but declares part_names \['feat'\]"):
        train_one_step(student, adapter, batch_maker(seed=0), 0, optimizer=opt, scheduler=sched, distiller=distiller)
    distiller.remove_hooks()


def test_a_normalised_term_of_a_method_that_declares_it_unsuitable_is_warned_at_build():
    from detdistill.distill.distiller import normalize_caveats

    sdf = DistillTermConfig(method="scalekd", normalize=True, params={"use_csa": False})
    pkd = DistillTermConfig(method="pkd", normalize=True, pairs=[["neck.p3", "neck.p3"]])
    (line,) = normalize_caveats([sdf, pkd])
    assert line.startswith("WARNING: distill term 'scalekd' sets `normalize: true`") and "diverged" in line
    assert normalize_caveats([DistillTermConfig(method="scalekd", params={"use_csa": False}), pkd]) == []
