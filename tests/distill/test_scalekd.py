"""ScaleKD: the SDF and CSA modules, the method's parts, its schedule and what it leaves behind."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from detdistill.config import DistillTermConfig
from detdistill.distill.distiller import Distiller, Teacher
from detdistill.distill.methods.scalekd import csa_residual_stats
from detdistill.distill.scalekd_modules import CrossScaleAssistant, MultiScaleCrossAttention, ScaleDecoupledFeatures
from detdistill.engine.train import train_one_step
from detdistill.modules import frozen_pass

LEVELS = [f"neck.p{lvl}" for lvl in (3, 4, 5, 6, 7)]
PAIRS = [(lvl, lvl) for lvl in LEVELS]


def _term(**params) -> DistillTermConfig:
    pairs = params.pop("pairs", PAIRS)
    return DistillTermConfig(method="scalekd", pairs=pairs, params=params)


# ---------------------------------------------------------------- modules
def test_one_parameter_set_serves_the_three_sdf_branches() -> None:
    torch.manual_seed(0)
    sdf = ScaleDecoupledFeatures(16, hidden=8, embed_dim=12, grid=2)
    convs = [m for m in sdf.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3  # reduce, the shared 3x3, expand: not three 3x3s
    x = torch.randn(2, 16, 9, 11)
    out = sdf(x)
    assert out.shape == (2, 3 * 12)
    # each branch is the shared 3x3 at its own dilation: recompute branch 2 by hand
    h = torch.relu(sdf.reduce(x))
    h = torch.relu(nn.functional.conv2d(h, sdf.conv3x3.weight, sdf.conv3x3.bias, padding=2, dilation=2))
    torch.testing.assert_close(sdf.branch(x, 2), x + sdf.expand(h))
    # the dilations really differ, and changing the one 3x3 weight changes every branch
    assert not torch.allclose(sdf.branch(x, 1), sdf.branch(x, 3))
    before = [sdf.branch(x, d).detach() for d in (1, 2, 3)]
    with torch.no_grad():
        sdf.conv3x3.weight.add_(0.5)
    assert all(not torch.allclose(b, sdf.branch(x, d)) for b, d in zip(before, (1, 2, 3)))
    # maps of another size (a 2x teacher input) flatten to the same embedding size
    assert sdf(torch.randn(2, 16, 18, 22)).shape == (2, 36)


def test_attention_shapes_per_head() -> None:
    torch.manual_seed(0)
    att = MultiScaleCrossAttention(q_channels=8, k_channels=12, v_channels=8, dim=16, rates=(1, 2, 4, 8))
    q, k, v = torch.randn(2, 8, 16, 12), torch.randn(2, 12, 16, 12), torch.randn(2, 8, 16, 12)
    out, weights = att.attention_maps(q, k, v)
    assert out.shape == (2, 16, 16, 12)
    for r, w in zip((1, 2, 4, 8), weights):
        assert w.shape == (2, 16 * 12, -(-16 // r) * -(-12 // r)), r
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 16 * 12))  # a softmax per query
    # keys come from k_src: a change there changes the attention; the queries stay student-side
    out2, _ = att.attention_maps(q, k + 1.0, v)
    assert not torch.allclose(out, out2)


def test_csa_sources_are_configurable_and_validated() -> None:
    csa = CrossScaleAssistant([8], [12], rates=(1, 2), sources=("s", "t", "t"))
    lvl = csa.levels[0]
    assert (lvl.q.in_features, lvl.k_msc[0].in_features, lvl.v_msc[0].in_features) == (8, 12, 12)
    out = csa([torch.randn(1, 8, 6, 6)], [torch.randn(1, 12, 6, 6)])
    assert out[0].shape == (1, 8, 6, 6)
    with pytest.raises(ValueError, match="three of 's'"):
        CrossScaleAssistant([8], [12], sources=("s", "x", "s"))


def test_csa_residual_stats_against_hand_computed_values() -> None:
    torch.manual_seed(0)
    fs = torch.randn(2, 4, 5, 6)
    same = csa_residual_stats([fs], [fs.clone()])
    assert same["assistant_residual_ratio"] == 0.0
    # a residual that is one vector per channel does not vary over positions at all
    per_channel = torch.randn(1, 4, 1, 1)
    flat = csa_residual_stats([fs], [fs + per_channel])
    assert flat["assistant_residual_spatial"] == pytest.approx(0.0, abs=1e-6)
    assert flat["assistant_residual_ratio"] == pytest.approx(float(per_channel.expand_as(fs).norm() / fs.norm()), rel=1e-5)
    # a zero-mean checkerboard varies everywhere; two levels are averaged
    board = (torch.arange(6).view(1, 1, 1, 6) + torch.arange(4).view(1, 1, 4, 1)) % 2 * 2.0 - 1.0
    fs2 = torch.randn(2, 4, 4, 6)
    both = csa_residual_stats([fs, fs2], [fs + per_channel, fs2 + 0.5 * board])
    assert both["assistant_residual_spatial"] == pytest.approx(0.5, abs=1e-6)
    ratio2 = float((0.5 * board).expand_as(fs2).norm() / fs2.norm())
    assert both["assistant_residual_ratio"] == pytest.approx((flat["assistant_residual_ratio"] + ratio2) / 2, rel=1e-5)


def test_frozen_pass_trains_nothing_and_restores_running_stats() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    stats = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    with frozen_pass(net):
        net(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradient reaches the input
    assert all(p.grad is None for p in net.parameters())  # and nothing of the module
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items())
    assert all(isinstance(p, nn.Parameter) for p in net.parameters())  # parameters are back


# ---------------------------------------------------------------- the method
@pytest.fixture
def fcos_pair(build):
    return build("fcos"), build("fcos", fpn=64, seed=1)


def test_parts_train_what_they_should(adapter, fcos_pair, batch):
    student, teacher = fcos_pair
    distiller = Distiller(student, adapter, [_term()], Teacher(teacher, adapter))
    method = distiller.method("scalekd")
    student.train()
    losses = distiller(student, batch, 0)
    assert {k for k in losses if k.startswith("kd/")} == {"kd/scalekd/feat", "kd/scalekd/cls", "kd/scalekd/bbox",
                                                          "kd/scalekd/csa"}
    assert all(float(losses[k].detach()) > 0 for k in losses if k.startswith("kd/"))
    csa_params = list(method.csa.parameters())
    head_params = list(student.head.parameters())
    body_params = list(student.backbone.parameters())
    # the CSA is trained by its ground-truth loss, and that loss trains nothing of the student
    g = torch.autograd.grad(losses["kd/scalekd/csa"], csa_params + head_params + body_params, allow_unused=True,
                            retain_graph=True)
    # (key biases shift every logit of a query alike, so softmax gives them no gradient; a level
    # whose coarsest head pools to one key has none for that head's keys either)
    got = {n: x for (n, _), x in zip(method.csa.named_parameters(), g)}
    # (P6/P7 of a 96x128 input are 2x2 and 1x1 maps: one key there, and Q/K get no gradient either)
    for lvl in range(len(PAIRS)):
        for name in ("v_msc.0.weight", "out.weight") + (("q.weight", "k_msc.0.weight") if lvl < 3 else ()):
            x = got[f"levels.{lvl}.{name}"]
            assert x is not None and x.abs().sum() > 0, f"level {lvl} {name}: no GT gradient"
    assert all(x is None or not x.any() for x in g[len(csa_params):]), "the CSA's GT loss trains the student"
    # the distillation parts train the student's head toward the (detached) assistant, not the assistant
    for part in ("cls", "bbox"):
        g = torch.autograd.grad(losses[f"kd/scalekd/{part}"], csa_params + head_params, allow_unused=True,
                                retain_graph=True)
        assert all(x is None or not x.any() for x in g[:len(csa_params)]), part
        assert any(x is not None and x.abs().sum() > 0 for x in g[len(csa_params):]), part
    # SDF: the student backbone and the SDF module learn from L_feat
    g = torch.autograd.grad(losses["kd/scalekd/feat"], body_params + list(method.sdf.parameters()), allow_unused=True)
    assert any(x is not None and x.abs().sum() > 0 for x in g[:len(body_params)])
    assert any(x is not None and x.abs().sum() > 0 for x in g[len(body_params):])
    distiller.remove_hooks()


@pytest.mark.parametrize("detach", [True, False])
def test_declared_assistant_parts_are_the_ones_that_never_reach_the_student(adapter, fcos_pair, batch, detach):
    """``assistant_parts`` (what reports leave out of the KD share) must say the truth: the CSA's
    GT loss reaches no student parameter when it reads detached maps, and does when it does not."""
    student, teacher = fcos_pair
    term = _term(detach_student_features=detach)
    distiller = Distiller(student, adapter, [term], Teacher(teacher, adapter))
    method_cls = type(distiller.method("scalekd"))
    student.train()
    losses = distiller(student, batch, 0)
    reaches = {}
    for part in ("feat", "cls", "bbox", "csa"):
        g = torch.autograd.grad(losses[f"kd/scalekd/{part}"], list(student.parameters()), allow_unused=True,
                                retain_graph=True)
        reaches[part] = any(x is not None and bool(x.any()) for x in g)
    assert method_cls.assistant_parts(term) == tuple(p for p, r in reaches.items() if not r), reaches
    assert method_cls.assistant_parts(_term(use_csa=False)) == ()
    distiller.remove_hooks()


def test_csa_gt_loss_falls_when_only_the_csa_trains(adapter, fcos_pair, batch):
    """The assistant learns its task: a few Adam steps on L_csa alone lower it."""
    student, teacher = fcos_pair
    distiller = Distiller(student, adapter, [_term(use_sdf=False)], Teacher(teacher, adapter))
    opt = torch.optim.Adam(distiller.method("scalekd").csa.parameters(), lr=1e-3)
    student.train()
    values = []
    for step in range(6):
        loss = distiller(student, batch, step)["kd/scalekd/csa"]
        values.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert values[-1] < values[0], values
    distiller.remove_hooks()


def test_warmup_and_backbone_freeze_schedule(adapter, fcos_pair, batch, sgd):
    student, teacher = fcos_pair
    distiller = Distiller(student, adapter, [_term(csa_start=2, freeze_backbone_steps=3)], Teacher(teacher, adapter))
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    body = list(student.backbone.body.parameters())
    fpn = list(student.backbone.fpn.parameters())
    for step in range(4):
        before = [p.detach().clone() for p in body]
        fpn_before = [p.detach().clone() for p in fpn]
        values = train_one_step(student, adapter, batch, step, optimizer=opt, scheduler=sched, distiller=distiller)
        csa_terms = [values[f"loss/kd/scalekd/{k}"] for k in ("cls", "bbox", "csa")]
        if step < 2:
            assert csa_terms == [0.0, 0.0, 0.0], step
            assert "diag/scalekd/assistant_det_loss" not in values
        else:
            assert all(v > 0 for v in csa_terms), step
            # the assistant's raw detection loss is reported (weight and csa_weight are 1 here)
            assert values["diag/scalekd/assistant_det_loss"] == pytest.approx(values["loss/kd/scalekd/csa"], rel=1e-6)
            assert values["diag/scalekd/assistant_residual_ratio"] > 0
            assert 0 <= values["diag/scalekd/assistant_residual_spatial"] <= 1
        assert values["loss/kd/scalekd/feat"] > 0
        moved = any(not torch.equal(a, p) for a, p in zip(before, body))
        assert moved == (step >= 3), f"step {step}: backbone moved={moved}"
        assert any(not torch.equal(a, p) for a, p in zip(fpn_before, fpn)), "the neck trains while the body is frozen"
        if step < 3:
            assert all(p.grad is None for p in body)
    distiller.remove_hooks()


def test_normalize_scales_each_part_when_it_starts(adapter, fcos_pair, batch, sgd):
    """``normalize: true`` keeps one factor per part, fixed at the part's first non-zero step: the
    CSA parts, zero until ``csa_start``, start as large as the task loss then, instead of being
    scaled by the factor the SDF part measured at step 0 (or by task / 0)."""
    student, teacher = fcos_pair
    term = DistillTermConfig(method="scalekd", pairs=PAIRS, params={"csa_start": 1}, weight=0.5, normalize=True)
    distiller = Distiller(student, adapter, [term], Teacher(teacher, adapter))
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    task = lambda v: sum(x for k, x in v.items() if k.startswith("loss/") and not k.startswith("loss/kd/"))  # noqa: E731
    first = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    assert first["loss/kd/scalekd/feat"] == pytest.approx(0.5 * task(first), rel=1e-5)
    assert [first[f"loss/kd/scalekd/{k}"] for k in ("cls", "bbox", "csa")] == [0.0, 0.0, 0.0]
    scales = distiller.kd_scales.clone()  # slots in part_names order: feat, cls, bbox, csa
    assert torch.isfinite(scales[0]) and torch.isnan(scales[1:]).all(), scales
    second = train_one_step(student, adapter, batch, 1, optimizer=opt, scheduler=sched, distiller=distiller)
    for part in ("cls", "bbox", "csa"):
        assert second[f"loss/kd/scalekd/{part}"] == pytest.approx(0.5 * task(second), rel=1e-5), part
    assert distiller.kd_scales[0] == scales[0]  # the SDF factor stays the one measured at step 0
    assert torch.isfinite(distiller.kd_scales).all()
    distiller.remove_hooks()


def test_csa_has_its_own_optimizer(adapter, build):
    """By default the assistant trains with the paper's Adam (lr 3e-4, wd 1e-4) beside the
    student's SGD; ``csa_optimizer: null`` puts it in the run's optimiser at ``csa_lr``; an
    unknown kind is refused naming the term."""
    from detdistill.config import TrainConfig
    from detdistill.engine.optim import OptimizerChain, build_optimizer

    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    for params, kinds in (({}, [torch.optim.SGD, torch.optim.Adam]), ({"csa_optimizer": None}, [torch.optim.SGD])):
        distiller = Distiller(student, adapter, [_term(**params)], Teacher(teacher, adapter))
        csa = {id(p) for p in distiller.methods["scalekd"].csa.parameters()}
        opt = build_optimizer(TrainConfig(lr=0.01, weight_decay=1e-4),
                              list(student.parameters()) + list(distiller.parameters()), distiller.optimizer_overrides())
        inner = opt.optimizers if isinstance(opt, OptimizerChain) else [opt]
        assert [type(o) for o in inner] == kinds
        owner = {id(p): (type(o), g) for o in inner for g in o.param_groups for p in g["params"]}
        assert all(owner[i][0] is kinds[-1] and owner[i][1]["lr"] == 3e-4 and owner[i][1]["weight_decay"] == 1e-4
                   for i in csa)
        assert owner[id(next(student.parameters()))][0] is torch.optim.SGD
        assert len(owner) == len({id(p) for p in (*student.parameters(), *distiller.parameters()) if p.requires_grad})
        distiller.remove_hooks()
    with pytest.raises(ValueError, match=r"'scalekd'.*csa_optimizer is one of .*got 'lion'"):
        Distiller(student, adapter, [_term(csa_optimizer="lion")], Teacher(teacher, adapter))


def test_higher_resolution_teacher_aligns_by_effective_stride(adapter, build, batch):
    """A 2x teacher: its P4 (stride 16 at 2x) covers 8 student pixels, like the student's P3.
    A teacher map coarser than its student level is refused; a finer one is average-pooled."""
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    coarser = [("neck.p3", "neck.p4")] + PAIRS[1:]
    with pytest.raises(ValueError, match=r"\[neck.p3, neck.p4\] is misaligned.*stride 8.*stride 16 at input scale 1"):
        Distiller(student, adapter, [_term(pairs=coarser)], Teacher(teacher, adapter))
    shifted = [(f"neck.p{lvl}", f"neck.p{lvl + 1}") for lvl in (3, 4, 5, 6)] + [("neck.p7", "neck.p7")]
    distiller = Distiller(student, adapter, [_term(pairs=shifted)], Teacher(teacher, adapter, input_scale=2.0))
    seen = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, who=who: seen.__setitem__(who, [v.shape for v in out.values()]))
             for who, m in (("s", student.backbone), ("t", teacher.backbone))]
    student.train()
    try:
        losses = distiller(student, batch, 0)
    finally:
        for h in hooks:
            h.remove()
    # aligned pairs: the teacher's P4..P7 at 2x have the student's P3..P6 sizes exactly
    assert [tuple(s[-2:]) for s in seen["s"][:4]] == [tuple(t[-2:]) for t in seen["t"][1:5]]
    assert all(float(losses[f"kd/scalekd/{p}"].detach()) > 0 for p in ("feat", "cls", "bbox", "csa"))
    distiller.remove_hooks()


def test_student_export_is_the_plain_detector(adapter, fcos_pair, batch, sgd, tmp_path):
    """Nothing of SDF or CSA is part of the student: same parameters, same exported file."""
    from safetensors.torch import load_file

    from detdistill.config import ModelConfig

    student, teacher = fcos_pair
    plain_keys = list(student.state_dict())
    distiller = Distiller(student, adapter, [_term()], Teacher(teacher, adapter))
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    distiller.remove_hooks()
    assert list(student.state_dict()) == plain_keys
    student_ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in student_ids for p in distiller.parameters())
    assert any(k.startswith("methods.scalekd.csa.") for k in distiller.state_dict())
    adapter.export(student, ModelConfig(arch="fcos", fpn_channels=32, head_convs=1), 3, tmp_path / "export")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(exported) == set(plain_keys)
    assert all(torch.equal(exported[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("arch", ["retinanet", "fasterrcnn"])
def test_one_and_two_stage_students(arch, adapter, build, batch, sgd):
    student = build(arch, head_convs=4 if arch == "retinanet" else 1)
    teacher = build(arch, fpn=64, seed=1, head_convs=4 if arch == "retinanet" else 1)
    if arch == "retinanet":
        # torchvision initialises RetinaNet's four head convs with std 0.01, so at step 0 its class
        # logits are the prior whatever the features: the student's and the assistant's differ by
        # ~1e-6 and their KL (~1e-13) has the sign of float rounding (it was -3e-13 on one CPU).
        # A trained head reads its features; Kaiming-initialised convs stand in for one.
        torch.manual_seed(5)
        for conv in (m for m in student.head.modules() if isinstance(m, torch.nn.Conv2d)):
            torch.nn.init.kaiming_normal_(conv.weight)
    levels = ["neck.p2", "neck.p3", "neck.p4", "neck.p5", "neck.p6"] if arch == "fasterrcnn" else LEVELS
    distiller = Distiller(student, adapter, [_term(pairs=[(lvl, lvl) for lvl in levels])], Teacher(teacher, adapter))
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    values = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    for part in ("feat", "cls", "bbox", "csa"):
        assert values[f"loss/kd/scalekd/{part}"] > 0, part
    distiller.remove_hooks()


def test_bad_terms_name_the_problem(adapter, fcos_pair):
    student, teacher = fcos_pair
    with pytest.raises(ValueError, match="the CSA needs `pairs`"):
        Distiller(student, adapter, [_term(pairs=[])], Teacher(teacher, adapter))
    with pytest.raises(ValueError, match="both off"):
        Distiller(student, adapter, [_term(use_sdf=False, use_csa=False)], Teacher(teacher, adapter))
    with pytest.raises(ValueError, match="sdf_taps is"):
        Distiller(student, adapter, [_term(sdf_taps="backbone.layer4")], Teacher(teacher, adapter))
    with pytest.raises(ValueError, match=r"unknown params \['alfa'\]"):
        Distiller(student, adapter, [_term(alfa=1.0)], Teacher(teacher, adapter))
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(student, adapter, [_term()], None)


def test_a_box_format_it_cannot_compare_is_refused_by_name(adapter, fcos_pair, batch):
    student, teacher = fcos_pair
    distiller = Distiller(student, adapter, [_term()], Teacher(teacher, adapter))
    method = next(iter(distiller.methods.values()))
    head = method._adapter.head

    def head_of_another_format(model, features, raw, b=None):
        raw.box_format = "cxcywh_norm"  # the student's own outputs, as a DETR would label them
        return head(model, features, raw, b)

    method._adapter = copy.copy(method._adapter)
    method._adapter.head = head_of_another_format
    student.train()
    with pytest.raises(ValueError, match=r"'scalekd' \(scalekd\): box format 'cxcywh_norm' is not supported"):
        distiller(student, batch, 0)
    distiller.remove_hooks()


def test_ultralytics_yolo_student(batch, sgd):
    """The protocol carries ScaleKD to ultralytics: SDF on the last backbone level, CSA on the
    three Detect inputs through the YOLO head, and the backbone freeze through the adapter."""
    pytest.importorskip("ultralytics")
    from detdistill.adapters.base import get_adapter
    from detdistill.config import ModelConfig

    adapter = get_adapter("ultralytics")
    torch.manual_seed(0)
    student = adapter.build(ModelConfig(framework="ultralytics", arch="yolov8n"), 3)
    teacher = adapter.build(ModelConfig(framework="ultralytics", arch="yolov8s"), 3)
    term = _term(pairs=[(f"neck.p{lvl}", f"neck.p{lvl}") for lvl in (3, 4, 5)], sdf_taps=["backbone.p5", "backbone.p5"],
                 freeze_backbone_steps=1)
    distiller = Distiller(student, adapter, [term], Teacher(teacher, adapter))
    backbone = adapter.backbone_parameters(student)
    assert backbone and len(backbone) < len(list(student.parameters()))
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()))
    before = [p.detach().clone() for p in backbone]
    values = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    for part in ("feat", "cls", "bbox", "csa"):
        assert values[f"loss/kd/scalekd/{part}"] > 0, part
    assert all(torch.equal(a, p) for a, p in zip(before, backbone))  # frozen at step 0
    distiller.remove_hooks()


def test_yolo_boxes_are_distilled_toward_the_assistant_as_dfl_distributions(batch):
    """On YOLOv8 the box outputs are DFL bin logits: L_bbox is the confidence-weighted KL over each
    side's distribution (as the `box` method), checked against a hand computation from the
    student's and the assistant's outputs that the step actually used."""
    pytest.importorskip("ultralytics")
    from detdistill.adapters.base import get_adapter
    from detdistill.config import ModelConfig

    adapter = get_adapter("ultralytics")
    torch.manual_seed(0)
    student = adapter.build(ModelConfig(framework="ultralytics", arch="yolov8n"), 3)
    teacher = adapter.build(ModelConfig(framework="ultralytics", arch="yolov8s"), 3)
    gamma = 0.5
    term = _term(pairs=[(f"neck.p{lvl}", f"neck.p{lvl}") for lvl in (3, 4, 5)], sdf_taps=["backbone.p5", "backbone.p5"],
                 gamma=gamma)
    distiller = Distiller(student, adapter, [term], Teacher(teacher, adapter))
    method = next(iter(distiller.methods.values()))
    seen: dict[str, object] = {}
    head = method._adapter.head

    def recording_head(model, features, raw, b=None):
        seen["student"], seen["assistant"] = raw, head(model, features, raw, b)
        return seen["assistant"]

    method._adapter = copy.copy(method._adapter)
    method._adapter.head = recording_head
    student.train()
    kd = distiller(student, batch, 0)["kd/scalekd/bbox"]
    s, a = seen["student"], seen["assistant"]
    assert s.box_format == "yolo_dfl"
    n, anchors, k = s.box_preds.shape
    p = torch.softmax(a.box_preds.detach().reshape(n, anchors, 4, k // 4), -1)
    log_q = torch.log_softmax(s.box_preds.detach().reshape(n, anchors, 4, k // 4), -1)
    per_anchor = (p * (p.log() - log_q)).sum(-1).mean(-1)  # temperature 1, mean over the four sides
    w = torch.sigmoid(a.cls_logits.detach()).amax(-1)
    assert kd.item() == pytest.approx(gamma * ((per_anchor * w).sum() / w.sum()).item(), rel=1e-4)
    distiller.remove_hooks()


def test_end_to_end_run_with_its_own_csa_optimizer_group(tmp_path, tiny_config, single_thread):
    """`train` builds ScaleKD from a config: the CSA gets its own optimiser group, the run
    finishes, evaluates and exports the plain student."""
    from detdistill.engine.checkpoint import load_checkpoint
    from detdistill.engine.train import train

    teacher_cfg = tiny_config(root=tmp_path / "T", name="teacher", model__fpn_channels=64, train__steps=1)
    train(teacher_cfg, resume=False, progress=False, log=lambda _m: None)
    cfg = tiny_config(root=tmp_path / "S", train__steps=3,
                      teacher={"checkpoint": str(teacher_cfg.run_dir / "checkpoints" / "last.pt")},
                      distill=[{"method": "scalekd", "pairs": [[lvl, lvl] for lvl in LEVELS],
                                "params": {"csa_start": 1, "freeze_backbone_steps": 1, "csa_lr": 5e-4}}])
    result = train(cfg, resume=False, progress=False, log=lambda _m: None)
    assert result.final is not None and result.steps == 3
    state = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    sgd, adam = state["optimizer"]["optimizers"]  # the student's SGD (decay, no-decay), the assistant's Adam
    assert len(sgd["param_groups"]) == 2 and [g["initial_lr"] for g in adam["param_groups"]] == [5e-4]
    assert adam["state"] and all("exp_avg" in v for v in adam["state"].values())  # it stepped
    assert any(k.startswith("methods.scalekd.csa.") for k in state["distiller"])
    assert not any("scalekd" in k or "csa" in k for k in state["model"])
    assert (cfg.run_dir / "export" / "model.safetensors").is_file()
    from detdistill.report.metrics_log import read_metrics
    logged = [r for r in read_metrics(cfg.run_dir) if r["split"] == "train"]
    # from csa_start (step index 1, logged as step 2) on; a diagnostic, not a loss term:
    assert [r["step"] for r in logged if "diag/scalekd/assistant_det_loss" in r] == [2, 3]
    assert all(r["diag/scalekd/assistant_det_loss"] > 0 for r in logged[1:])
    assert all(r["loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("loss/")), rel=1e-5) for r in logged)
