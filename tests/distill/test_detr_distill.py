"""DETRDistill's logits and target-aware feature distillation.

- The matching: brute-force optimum on small cases, positives before negatives, empty sets.
- The losses against independent recomputations (by hand / numpy), and loss(x, x) = 0.
- Through the Distiller on Deformable DETR and RT-DETR pairs: the teacher is bit-identical after
  a step, gradients reach only the student and the method's modules, and the logged terms equal
  the loss functions on independently taken outputs.
- Heterogeneous pairs: a DETR teacher into an FCOS student, an FCOS teacher into a DETR student.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from detdistill.distill.methods.detr import layer_mapping
from detdistill.losses.hungarian_logits import hungarian_logit_loss, match_to_teacher
from detdistill.losses.set_matching import box_cost, focal_class_cost, hungarian
from detdistill.losses.target_aware import query_quality, target_aware_loss, target_aware_mask


def _brute_force(cost: np.ndarray) -> float:
    q, k = cost.shape
    if q >= k:
        return min(sum(cost[r, c] for c, r in enumerate(rows)) for rows in itertools.permutations(range(q), k))
    return min(sum(cost[r, c] for r, c in enumerate(cols)) for cols in itertools.permutations(range(k), q))


@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 5), (6, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hungarian_finds_the_brute_force_optimum(shape: tuple[int, int], seed: int) -> None:
    cost = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    rows, cols = hungarian(cost)
    assert len(rows) == min(shape) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert float(cost[rows, cols].sum()) == pytest.approx(_brute_force(cost.numpy().astype(np.float64)), abs=1e-6)


def test_hungarian_respects_allowed_rows_and_empty_sets() -> None:
    cost = torch.tensor([[0.0, 9.0], [9.0, 0.0], [1.0, 1.0]])
    rows, cols = hungarian(cost, allowed_rows=torch.tensor([False, True, True]))
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(1, 1), (2, 0)]
    for empty in (torch.zeros(3, 0), torch.zeros(0, 3)):
        r, c = hungarian(empty)
        assert len(r) == len(c) == 0


def _cxcywh(*boxes: list[float]) -> torch.Tensor:
    return torch.tensor(boxes, dtype=torch.float32)


def test_positives_are_matched_first_then_negatives_to_the_remaining_queries() -> None:
    # teacher: queries 0 and 2 confident (class 1, class 0), 1 and 3 not
    t_logits = torch.tensor([[-5.0, 3.0], [-4.0, -4.0], [2.0, -5.0], [-3.0, -3.5]])
    t_boxes = _cxcywh([0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1], [0.3, 0.7, 0.1, 0.2])
    # student: query 3 sits on teacher 0, query 0 on teacher 2, query 1 on teacher 1, query 2 on teacher 3
    s_boxes = _cxcywh([0.8, 0.8, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.3, 0.7, 0.1, 0.2], [0.2, 0.2, 0.1, 0.1])
    s_logits = torch.zeros(4, 2)
    (sp, tp), (sn, tn) = match_to_teacher(s_logits, s_boxes, t_logits, t_boxes, positive_threshold=0.5)
    assert sorted(zip(sp.tolist(), tp.tolist())) == [(0, 2), (3, 0)]
    assert sorted(zip(sn.tolist(), tn.tolist())) == [(1, 1), (2, 3)]
    # the loss of this assignment, recomputed by hand: focal over every query and class, targets
    # one-hot on positives; boxes are identical, so the box terms vanish
    parts = hungarian_logit_loss(s_logits[None], s_boxes[None], t_logits[None], t_boxes[None], positive_threshold=0.5)
    p = 0.5  # sigmoid(0)
    focal_pos = 0.25 * (1 - p) ** 2 * -np.log(p)
    focal_neg = 0.75 * p ** 2 * -np.log(1 - p)
    expected_cls = (2 * focal_pos + 6 * focal_neg) / 2  # 2 positives: 2 targets of 1, 6 of 0, over 2 positives
    assert float(parts["cls"]) == pytest.approx(expected_cls, rel=1e-5)
    assert float(parts["box_pos"]) == pytest.approx(0.0, abs=1e-6)
    assert float(parts["box_neg"]) == pytest.approx(0.0, abs=1e-6)


def test_box_terms_equal_an_independent_recomputation() -> None:
    g = torch.Generator().manual_seed(3)
    s_boxes = torch.rand(2, 5, 4, generator=g) * 0.5 + 0.25
    t_boxes = torch.rand(2, 4, 4, generator=g) * 0.5 + 0.25
    s_logits, t_logits = torch.randn(2, 5, 3, generator=g), torch.randn(2, 4, 3, generator=g) * 3
    parts = hungarian_logit_loss(s_logits, s_boxes, t_logits, t_boxes, positive_threshold=0.5, negative_weight=0.5)
    num = {"pos": 0.0, "neg": 0.0}
    count = {"pos": 0, "neg": 0}
    for i in range(2):
        pos_mask = t_logits[i].sigmoid().max(-1).values >= 0.5
        (sp, tp), (sn, tn) = match_to_teacher(s_logits[i], s_boxes[i], t_logits[i], t_boxes[i], positive_threshold=0.5)
        assert set(tp.tolist()) == set(pos_mask.nonzero().flatten().tolist()[:5])  # every positive fits in 5 queries
        assert set(tn.tolist()) <= set((~pos_mask).nonzero().flatten().tolist())
        for kind, (s_idx, t_idx) in (("pos", (sp, tp)), ("neg", (sn, tn))):
            for a, b in zip(s_idx.tolist(), t_idx.tolist()):
                sb, tb = s_boxes[i, a], t_boxes[i, b]
                giou = generalized_box_iou(box_convert(sb[None], "cxcywh", "xyxy"), box_convert(tb[None], "cxcywh", "xyxy"))
                num[kind] += 5 * float((sb - tb).abs().sum()) + 2 * float(1 - giou)
                count[kind] += 1
    assert count["pos"] > 0 and count["neg"] > 0
    assert float(parts["box_pos"]) == pytest.approx(num["pos"] / count["pos"], rel=1e-5)
    assert float(parts["box_neg"]) == pytest.approx(0.5 * num["neg"] / count["neg"], rel=1e-5)


def test_batched_equals_per_image_when_counts_are_equal() -> None:
    g = torch.Generator().manual_seed(4)
    s_logits, s_boxes = torch.randn(2, 6, 2, generator=g), torch.rand(2, 6, 4, generator=g) * 0.5 + 0.25
    t_logits, t_boxes = torch.randn(2, 6, 2, generator=g), torch.rand(2, 6, 4, generator=g) * 0.5 + 0.25
    t_logits[:, :2] += 10  # exactly two positives per image, so batch normalisation = the mean of per-image ones
    t_logits[:, 2:] -= 10
    whole = hungarian_logit_loss(s_logits, s_boxes, t_logits, t_boxes)
    single = [hungarian_logit_loss(s_logits[i:i + 1], s_boxes[i:i + 1], t_logits[i:i + 1], t_boxes[i:i + 1]) for i in range(2)]
    for k in whole:
        assert float(whole[k]) == pytest.approx((float(single[0][k]) + float(single[1][k])) / 2, rel=1e-5)


def test_no_confident_teacher_prediction_and_empty_teacher_sets_work() -> None:
    s_logits, s_boxes = torch.randn(1, 4, 2), torch.rand(1, 4, 4) * 0.5 + 0.25
    t_logits = torch.full((1, 3, 2), -8.0)  # nothing confident: every query a negative
    parts = hungarian_logit_loss(s_logits.requires_grad_(), s_boxes, t_logits, torch.rand(1, 3, 4) * 0.5 + 0.25)
    assert float(parts["box_pos"]) == 0.0 and float(parts["box_neg"]) > 0
    assert torch.isfinite(parts["cls"]) and float(parts["cls"].detach()) > 0  # every student query pushed to background
    parts["cls"].backward()
    empty = hungarian_logit_loss(torch.randn(1, 4, 2), torch.rand(1, 4, 4), torch.zeros(1, 0, 2), torch.zeros(1, 0, 4))
    assert all(torch.isfinite(v) for v in empty.values())


def test_soft_mode_matches_every_teacher_query_with_bce_against_its_probabilities() -> None:
    g = torch.Generator().manual_seed(6)
    s_logits, s_boxes = torch.randn(1, 3, 2, generator=g), torch.rand(1, 3, 4, generator=g) * 0.5 + 0.25
    t_logits = torch.randn(1, 3, 2, generator=g)
    parts = hungarian_logit_loss(s_logits, s_boxes, t_logits, s_boxes.clone(), mode="soft")
    assert set(parts) == {"cls", "box"} and float(parts["box"]) == pytest.approx(0.0, abs=1e-6)
    (sp, tp), _ = match_to_teacher(s_logits[0], s_boxes[0], t_logits[0], s_boxes[0].clone(), mode="soft")
    assert len(sp) == 3
    bce = torch.nn.functional.binary_cross_entropy_with_logits(s_logits[0, sp], t_logits[0, tp].sigmoid(), reduction="sum")
    assert float(parts["cls"]) == pytest.approx(float(bce) / 3, rel=1e-5)


def test_focal_class_cost_is_lower_for_the_right_class() -> None:
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    cost = focal_class_cost(logits, torch.tensor([0, 1]))
    assert cost[0, 0] < cost[1, 0] and cost[1, 1] < cost[0, 1]
    boxes = _cxcywh([0.5, 0.5, 0.2, 0.2])
    assert float(box_cost(boxes, boxes)[0, 0]) == pytest.approx(-2.0)  # L1 0, GIoU 1


@pytest.mark.parametrize("student,teacher,expected", [(2, 2, [0, 1]), (3, 6, [0, 2, 5]), (1, 6, [5]),
                                                       (6, 3, [0, 0, 1, 1, 2, 2]), (3, 3, [0, 1, 2])])
def test_layer_mapping_is_evenly_spaced_and_last_to_last(student: int, teacher: int, expected: list[int]) -> None:
    assert layer_mapping(student, teacher) == expected


# ----------------------------------------------------------------- target-aware features
def test_target_aware_mask_equals_a_numpy_recomputation() -> None:
    g = torch.Generator().manual_seed(7)
    feature, queries, quality = torch.randn(8, 5, 6, generator=g), torch.randn(4, 8, generator=g), torch.rand(4, generator=g)
    mask = target_aware_mask(feature, queries, quality, clamp_min=1e-2)
    f = feature.numpy().reshape(8, -1)
    f = f / np.linalg.norm(f, axis=0, keepdims=True)
    q = queries.numpy() / np.linalg.norm(queries.numpy(), axis=1, keepdims=True)
    raw = np.maximum((quality.numpy()[:, None] * (q @ f)).sum(0), 1e-2)
    np.testing.assert_allclose(mask.numpy().ravel(), raw / raw.max(), rtol=1e-5)
    assert float(mask.max()) == pytest.approx(1.0)
    maps = torch.randn(2, 8, 5, 6)
    assert float(target_aware_loss(maps, maps.clone(), torch.rand(2, 5, 6))) == 0.0  # loss(x, x) = 0


def test_query_quality_is_score_times_max_iou_or_score_without_ground_truth() -> None:
    logits = torch.tensor([[2.0, -9.0], [-9.0, 1.0], [0.0, -9.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 5.0, 10.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    q, quality = query_quality(logits, boxes, gt, top_k=3)
    assert q.tolist() == [0, 1, 2]  # by score: sigmoid(2) > sigmoid(1) > sigmoid(0)
    expected = logits.sigmoid().max(-1).values * box_iou(boxes, gt).max(1).values
    assert torch.allclose(quality, expected)
    _, alone = query_quality(logits, boxes, torch.zeros(0, 4), top_k=3)
    assert torch.allclose(alone, logits.sigmoid().max(-1).values)


# ----------------------------------------------------------------- through the Distiller
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="the [detr] extra (transformers) is not installed")


def _detr(arch: str, layers: int, seed: int, d_model: int):
    from detdistill.adapters.base import get_adapter
    from detdistill.config import ModelConfig

    torch.manual_seed(seed)
    opts = {"d_model": d_model, "num_queries": 8, "decoder_layers": layers, "encoder_layers": 1, "decoder_ffn_dim": 64,
            "encoder_ffn_dim": 64, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
    if arch.startswith("rt_detr"):
        opts["num_denoising"] = 6
    return get_adapter("transformers").build(ModelConfig(framework="transformers", arch=arch, options=opts), 3)


@needs_transformers
@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("arch", ["deformable_detr", "rt_detr"])
def test_one_kd_step_trains_only_the_student_and_the_methods_and_logs_the_losses(arch: str, batch, sgd) -> None:
    from detdistill.adapters.base import get_adapter
    from detdistill.config import DistillTermConfig
    from detdistill.distill.distiller import Distiller, Teacher
    from detdistill.engine.train import train_one_step

    adapter = get_adapter("transformers")
    student, teacher = _detr(arch, 2, 0, 32), _detr(arch, 3, 1, 64)
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    terms = [DistillTermConfig(method="detr_logits", params={"positive_threshold": 0.1}),
             DistillTermConfig(method="detr_feature", pairs=[("neck.p3", "neck.p3"), ("neck.p4", "neck.p4")])]
    distiller = Distiller(student, adapter, terms, Teacher(teacher, adapter))
    assert distiller.method("detr_logits").mapping == [0, 2]
    # independent reference: the teacher's and the student's outputs taken by hand, same RNG
    with torch.no_grad():
        t_raw = adapter.forward_features(teacher, batch.images, need_head=True)
    student.train()
    torch.manual_seed(11)
    _, s_raw = adapter.forward_train(student, batch, need_raw=True)
    expected = {}
    for j, i in enumerate([0, 2]):
        for k, v in hungarian_logit_loss(s_raw.layer_logits[j], s_raw.layer_boxes[j], t_raw.layer_logits[i],
                                         t_raw.layer_boxes[i], positive_threshold=0.1).items():
            expected[k] = expected.get(k, 0.0) + float(v.detach())
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()), lr=1e-3)
    torch.manual_seed(11)
    values = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    for k, v in expected.items():
        assert values[f"loss/kd/detr_logits/{k}"] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert values["loss/kd/detr_feature"] > 0
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher changed: {k}"
    assert all(p.grad is None for p in teacher.parameters())
    connectors = list(distiller.method("detr_feature").connectors.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for c in connectors for p in c.parameters())
    distiller.remove_hooks()


@needs_transformers
@pytest.mark.usefixtures("single_thread")
def test_heterogeneous_pairs_distil_across_families(batch, sgd) -> None:
    from detdistill.adapters.base import get_adapter
    from detdistill.config import DistillTermConfig, ModelConfig
    from detdistill.distill.distiller import Distiller, Teacher
    from detdistill.engine.train import train_one_step

    tv, hf = get_adapter("torchvision"), get_adapter("transformers")
    torch.manual_seed(0)
    fcos = tv.build(ModelConfig(arch="fcos", fpn_channels=32, head_convs=1), 3)
    detr = _detr("deformable_detr", 2, 1, 64)
    # a DETR teacher into a CNN student: target-aware features and PKD on its input projections
    distiller = Distiller(fcos, tv, [DistillTermConfig(method="detr_feature", pairs=[("neck.p3", "neck.p3")]),
                                     DistillTermConfig(method="pkd", pairs=[("neck.p4", "neck.p4")])], Teacher(detr, hf))
    opt, sched = sgd(list(fcos.parameters()) + list(distiller.parameters()), lr=1e-3)
    values = train_one_step(fcos, tv, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    assert values["loss/kd/detr_feature"] > 0 and values["loss/kd/pkd"] > 0
    distiller.remove_hooks()
    # a CNN teacher into a DETR student: PKD and SSIM on the DETR's maps, through connectors
    rt = _detr("rt_detr", 2, 2, 32)
    fcos_t = tv.build(ModelConfig(arch="fcos", fpn_channels=64, head_convs=1), 3)
    distiller = Distiller(rt, hf, [DistillTermConfig(method="pkd", pairs=[("neck.p3", "neck.p3")]),
                                   DistillTermConfig(method="ssim", pairs=[("encoder.p4", "neck.p4")])], Teacher(fcos_t, tv))
    opt, sched = sgd(list(rt.parameters()) + list(distiller.parameters()), lr=1e-3)
    values = train_one_step(rt, hf, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    assert values["loss/kd/pkd"] > 0 and values["loss/kd/ssim"] > 0
    distiller.remove_hooks()
    # logits distillation needs a DETR on both sides, and sigmoid classes: errors name the side
    with pytest.raises(ValueError, match="the student is not a DETR"):
        Distiller(fcos, tv, [DistillTermConfig(method="detr_logits")], Teacher(detr, hf))
    with pytest.raises(ValueError, match="the teacher is not a DETR"):
        Distiller(rt, hf, [DistillTermConfig(method="detr_feature", pairs=[("neck.p3", "neck.p3")])], Teacher(fcos_t, tv))
    plain = _detr("detr", 2, 3, 32)
    with pytest.raises(ValueError, match="softmax over C \\+ 1 classes"):
        Distiller(rt, hf, [DistillTermConfig(method="detr_logits")], Teacher(plain, hf))


@needs_transformers
@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("mode,parts", [("paper", ("cls", "box_pos", "box_neg")), ("soft", ("cls", "box"))])
def test_logit_parts_follow_the_mode_and_each_is_normalised_on_its_own(mode: str, parts: tuple[str, ...], batch,
                                                                      sgd) -> None:
    from detdistill.adapters.base import get_adapter
    from detdistill.config import DistillTermConfig
    from detdistill.distill.distiller import Distiller, Teacher
    from detdistill.engine.train import train_one_step

    hf = get_adapter("transformers")
    student, teacher = _detr("rt_detr", 2, 0, 32), _detr("rt_detr", 3, 1, 64)
    term = DistillTermConfig(method="detr_logits", params={"mode": mode}, weight=0.25, normalize=True)
    distiller = Distiller(student, hf, [term], Teacher(teacher, hf))
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()), lr=1e-3)
    values = train_one_step(student, hf, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    kd = {k.removeprefix("loss/kd/detr_logits/"): v for k, v in values.items() if k.startswith("loss/kd/")}
    task = sum(v for k, v in values.items() if k.startswith("loss/") and not k.startswith("loss/kd/"))
    assert sorted(kd) == sorted(parts)
    for part in parts:  # every part that is non-zero starts at weight x the task loss
        assert kd[part] == 0.0 or kd[part] == pytest.approx(0.25 * task, rel=1e-5), (part, kd[part], task)
    assert sum(v > 0 for v in kd.values()) >= 2
    distiller.remove_hooks()


# ----------------------------------------------------------------- query-prior assignment
@needs_transformers
@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("arch", ["deformable_detr", "rt_detr"])
def test_a_query_group_of_the_models_own_decoder_inputs_reproduces_its_outputs(arch: str, batch) -> None:
    """The group pass is the decoder's own computation: fed the inputs the model's decoder
    started from, it gives the model's per-layer logits and boxes."""
    from detdistill.adapters.base import get_adapter

    adapter = get_adapter("transformers")
    model = _detr(arch, 2, 0, 32).eval()
    with torch.no_grad():
        own = adapter.forward_features(model, batch.images, need_head=True)
        _, raw = adapter.forward_train(model, batch, need_raw=True, extra_inputs={"query_group": own.decoder_queries})
    for mine, theirs in zip(raw.group_layer_logits + raw.group_layer_boxes, own.layer_logits + own.layer_boxes):
        assert torch.allclose(mine, theirs, atol=1e-6)


@needs_transformers
@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("arch", ["deformable_detr", "rt_detr"])
def test_the_query_group_never_touches_the_students_own_queries_or_inference(arch: str, batch) -> None:
    from detdistill.adapters.base import get_adapter
    from detdistill.structures import QueryGroup

    adapter = get_adapter("transformers")
    student, teacher = _detr(arch, 2, 0, 32), _detr(arch, 2, 1, 32)
    with torch.no_grad():
        prior = adapter.forward_features(teacher.eval(), batch.images, need_head=True).decoder_queries
    assert isinstance(prior, QueryGroup) and prior.kind == arch
    # two copies of the same weights: one trains a forward without the group, one with it
    with_group = copy.deepcopy(student).train()
    student.train()
    torch.manual_seed(9)
    plain_losses, plain = adapter.forward_train(student, batch, need_raw=True)
    torch.manual_seed(9)
    losses, grouped = adapter.forward_train(with_group, batch, need_raw=True, extra_inputs={"query_group": prior})
    assert torch.equal(losses["detr_loss"], plain_losses["detr_loss"])  # the group is not in the task loss
    for a, b in zip(grouped.layer_logits + grouped.layer_boxes, plain.layer_logits + plain.layer_boxes):
        assert torch.equal(a, b)  # own queries: bit-identical with and without the group
    assert len(grouped.group_layer_logits) == 2 and grouped.group_layer_logits[0].shape == (2, 8, 3)
    # inference afterwards (BN statistics moved by both forwards alike) is bit-identical
    for a, b in zip(adapter.predict(student, batch.images), adapter.predict(with_group, batch.images)):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    assert all(torch.equal(v, with_group.state_dict()[k]) for k, v in student.state_dict().items())
    with pytest.raises(ValueError, match="extra training input 'query_group' only"):
        adapter.forward_train(student, batch, extra_inputs={"queries": prior})


@needs_transformers
@pytest.mark.usefixtures("single_thread")
def test_query_prior_uses_the_teachers_assignment_and_trains_only_student_and_projections(batch, sgd) -> None:
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher

    from detdistill.adapters.base import get_adapter
    from detdistill.config import DistillTermConfig
    from detdistill.distill.distiller import Distiller, Teacher
    from detdistill.distill.method import StepContext
    from detdistill.engine.train import train_one_step

    adapter = get_adapter("transformers")
    student, teacher = _detr("deformable_detr", 2, 0, 32), _detr("deformable_detr", 3, 1, 64)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = Distiller(student, adapter, [DistillTermConfig(method="detr_query_prior")], Teacher(teacher, adapter))
    method = distiller.method("detr_query_prior")
    # the assignment equals transformers' own Deformable DETR matcher on the teacher's predictions
    with torch.no_grad():
        t_raw = adapter.forward_features(teacher, batch.images, need_head=True)
        s_raw = adapter.forward_features(student, batch.images, need_head=True)
    ctx = StepContext(0, batch, student, None, None, s_raw, t_raw)  # type: ignore[arg-type]
    ours = method.teacher_assignment(ctx)
    labels = [{"class_labels": t.labels, "boxes": box_convert(t.boxes, "xyxy", "cxcywh") / torch.tensor([128.0, 96, 128, 96])}
              for t in batch.targets]
    theirs = DeformableDetrHungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)(
        {"logits": t_raw.layer_logits[-1], "pred_boxes": t_raw.layer_boxes[-1]}, labels)
    for (q, gt, lab), (rows, cols), target in zip(ours, theirs, labels):
        order = rows.argsort()
        assert q.tolist() == rows[order].tolist()
        assert torch.allclose(gt, target["boxes"][cols[order]]) and lab.tolist() == target["class_labels"][cols[order]].tolist()
    opt, sched = sgd(list(student.parameters()) + list(distiller.parameters()), lr=1e-3)
    values = train_one_step(student, adapter, batch, 0, optimizer=opt, scheduler=sched, distiller=distiller)
    assert values["loss/kd/detr_query_prior/cls"] > 0 and values["loss/kd/detr_query_prior/box"] > 0
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert method.embed_proj.weight.grad is not None and method.embed_proj.weight.grad.abs().sum() > 0
    assert method.position_proj.weight.grad is not None
    distiller.remove_hooks()
    # a decoder without reference points, or another architecture, is refused by name
    with pytest.raises(ValueError, match="the teacher has no decoder that takes a query group"):
        Distiller(student, adapter, [DistillTermConfig(method="detr_query_prior")],
                  Teacher(_detr("conditional_detr", 2, 2, 32), adapter))
    with pytest.raises(ValueError, match="need the same DETR architecture"):
        Distiller(student, adapter, [DistillTermConfig(method="detr_query_prior")], Teacher(_detr("rt_detr", 2, 2, 32), adapter))
