"""Box KD (`box`): the logged term equals an independent computation on the heads' raw outputs,
is zero for a student that predicts the teacher's boxes, works on YOLOv8's DFL bins, and a
pair whose heads do not line up is refused when built."""

from __future__ import annotations

import copy

import pytest
import torch

from detdistill.adapters.base import get_adapter
from detdistill.config import DistillTermConfig, ModelConfig
from detdistill.distill.distiller import Distiller, Teacher

TERM = DistillTermConfig(method="box")


def _smooth_l1(d: torch.Tensor) -> torch.Tensor:
    d = d.abs()
    return torch.where(d < 1.0, 0.5 * d * d, d - 0.5)


def test_fcos_term_equals_the_confidence_weighted_smooth_l1(adapter, build, batch) -> None:
    student, teacher = build("fcos"), build("fcos", fpn=64, seed=1)
    distiller = Distiller(student, adapter, [TERM], Teacher(teacher, adapter))
    student.train()
    logged = distiller(student, batch, 0)["kd/box"]
    with torch.no_grad():  # the same batch again: train-mode BN uses batch statistics, so the outputs repeat
        s = adapter.forward_train(student, batch, need_raw=True)[1]
        t = adapter.forward_features(teacher, batch.images, need_head=True)
    assert s.box_format == t.box_format == "fcos_ltrb"
    w = torch.sigmoid(t.cls_logits).amax(-1)
    expected = (_smooth_l1(s.box_preds - t.box_preds).mean(-1) * w).sum() / w.sum()
    assert logged.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logged.item() > 0


def test_a_student_with_the_teachers_head_outputs_costs_nothing(adapter, build, batch) -> None:
    teacher = build("fcos", norm="frozen_bn", seed=1)  # frozen BN: train and eval mode give the same outputs
    student = copy.deepcopy(teacher)
    distiller = Distiller(student, adapter, [TERM], Teacher(teacher, adapter))
    student.train()
    assert distiller(student, batch, 0)["kd/box"].item() == pytest.approx(0.0, abs=1e-7)


def test_yolov8_dfl_bins_are_distilled_as_distributions(batch) -> None:
    yolo = get_adapter("ultralytics")
    torch.manual_seed(0)
    student = yolo.build(ModelConfig(framework="ultralytics", arch="yolov8n"), 3)
    teacher = yolo.build(ModelConfig(framework="ultralytics", arch="yolov8s"), 3)
    distiller = Distiller(student, yolo, [DistillTermConfig(method="box", params={"temperature": 2.0})],
                          Teacher(teacher, yolo))
    student.train()
    kd = distiller(student, batch, 0)["kd/box"]
    with torch.no_grad():
        s = yolo.forward_train(student, batch, need_raw=True)[1]
        t = yolo.forward_features(teacher, batch.images, need_head=True)
    assert s.box_format == "yolo_dfl" and s.box_preds.shape[-1] % 4 == 0
    n, a, k = s.box_preds.shape
    p = torch.softmax(t.box_preds.reshape(n, a, 4, k // 4) / 2.0, -1)
    log_q = torch.log_softmax(s.box_preds.reshape(n, a, 4, k // 4) / 2.0, -1)
    per_anchor = (p * (p.log() - log_q)).sum(-1).mean(-1) * 4.0  # T^2, mean over the four sides
    w = torch.sigmoid(t.cls_logits).amax(-1)
    assert kd.item() == pytest.approx(((per_anchor * w).sum() / w.sum()).item(), rel=1e-4)
    grads = torch.autograd.grad(kd, [q for q in student.parameters() if q.requires_grad], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_heads_that_do_not_line_up_are_refused_at_build(adapter, build) -> None:
    with pytest.raises(ValueError, match=r"retinanet_deltas \(12276, 4\).*fcos_ltrb \(1364, 4\).*same head layout"):
        Distiller(build("retinanet"), adapter, [TERM], Teacher(build("fcos", seed=1), adapter))


def test_pairs_and_bad_params_are_refused(adapter, build) -> None:
    with pytest.raises(ValueError, match="remove `pairs`"):
        Distiller(build("fcos"), adapter, [DistillTermConfig(method="box", pairs=[("neck.p3", "neck.p3")])],
                  Teacher(build("fcos", seed=1), adapter))
    with pytest.raises(ValueError, match="beta and temperature must be > 0"):
        Distiller(build("fcos"), adapter, [DistillTermConfig(method="box", params={"beta": 0.0})],
                  Teacher(build("fcos", seed=1), adapter))


def test_detr_boxes_are_refused_at_build_naming_the_format() -> None:
    detr = get_adapter("transformers")
    opts = {"d_model": 32, "num_queries": 8, "decoder_layers": 1, "encoder_layers": 1, "decoder_ffn_dim": 64,
            "encoder_ffn_dim": 64, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
    torch.manual_seed(0)
    student, teacher = (detr.build(ModelConfig(framework="transformers", arch="detr", options=opts), 3) for _ in range(2))
    with pytest.raises(ValueError, match=r"box format 'cxcywh_norm' is not supported \(supported: fcos_ltrb"):
        Distiller(student, detr, [TERM], Teacher(teacher, detr))
