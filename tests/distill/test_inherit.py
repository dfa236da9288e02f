"""The inheriting strategy (`teacher.inherit`): the student's neck and head start as the teacher's,
its backbone stays its own, no random number is drawn, and a mismatch is named."""

from __future__ import annotations

import pytest
import torch

from detdistill.adapters.base import get_adapter
from detdistill.config import ModelConfig
from detdistill.distill.inherit import backbone_prefixes, inherit_neck_and_head
from detdistill.engine.checkpoint import load_checkpoint
from detdistill.engine.restore import restore_model
from detdistill.engine.setup import build_run
from detdistill.engine.train import train


def _tiny_detr(arch: str) -> torch.nn.Module:
    opts = {"d_model": 32, "num_queries": 8, "decoder_layers": 1, "encoder_layers": 1, "decoder_ffn_dim": 64,
            "encoder_ffn_dim": 64, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
    return get_adapter("transformers").build(ModelConfig(framework="transformers", arch=arch, options=opts), 3)


@pytest.mark.parametrize(("framework", "arch", "expected"), [
    ("torchvision", "fcos", ["backbone.body"]),
    ("torchvision", "retinanet", ["backbone.body"]),
    ("torchvision", "fasterrcnn", ["backbone.body"]),
    ("torchvision", "yolo_pafpn", ["backbone.body"]),
    ("ultralytics", "yolov8n", [f"model.{i}" for i in range(10)]),
    ("transformers", "detr", ["model.backbone"]),
])
def test_the_backbone_is_what_each_adapter_names(framework: str, arch: str, expected: list[str]) -> None:
    adapter = get_adapter(framework)
    if framework == "transformers":
        model = _tiny_detr(arch)
    else:
        convs = 4 if arch == "retinanet" else 1  # RetinaNetHead has a fixed depth
        model = adapter.build(ModelConfig(framework=framework, arch=arch, fpn_channels=32, head_convs=convs), 3)
    prefixes = backbone_prefixes(model, adapter)
    assert sorted(prefixes) == sorted(expected)
    # independent check: the prefixes hold exactly the adapter's backbone parameters
    inside = {id(p) for n, p in model.named_parameters() if any(n.startswith(q + ".") for q in prefixes)}
    assert inside == {id(p) for p in adapter.backbone_parameters(model)}


def test_r34_teacher_gives_an_r18_student_its_neck_and_head_only(build, adapter) -> None:
    teacher = build("fcos", backbone="resnet34", seed=1)
    student = build("fcos", backbone="resnet18", seed=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rng = torch.get_rng_state()
    done = inherit_neck_and_head(student, teacher, adapter)
    assert torch.equal(torch.get_rng_state(), rng)  # draws nothing: the seed's crops are unchanged
    t_state, s_state = teacher.state_dict(), student.state_dict()
    neck_head = [k for k in s_state if not k.startswith("backbone.body.")]
    assert sorted(done.keys) == sorted(neck_head) and any(k.startswith("backbone.fpn.") for k in neck_head)
    for k in neck_head:
        assert torch.equal(s_state[k], t_state[k]), k
    for k, v in s_state.items():
        if k.startswith("backbone.body."):
            assert torch.equal(v, before[k]), f"{k}: the backbone must keep the student's init"
    head_params = sum(p.numel() for n, p in student.named_parameters() if not n.startswith("backbone.body."))
    assert done.parameters == head_params > 0
    assert "backbone.body" in done.summary()
    # the copy is the student's own: training the student leaves the teacher as it was
    next(student.head.parameters()).data.add_(1.0)
    assert not torch.equal(next(student.head.parameters()), next(teacher.head.parameters()))


def test_another_neck_width_is_refused_naming_the_entries(build, adapter) -> None:
    teacher = build("fcos", backbone="resnet34", fpn=64)
    student = build("fcos", backbone="resnet18", fpn=32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot inherit.*\n  other shape: backbone\.fpn\.inner_blocks\.0\.0\.weight: "
                                         r"student \(32, 128, 1, 1\), teacher \(64, 128, 1, 1\)"):
        inherit_neck_and_head(student, teacher, adapter)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # nothing half-copied


def test_another_head_is_refused_naming_what_the_teacher_lacks(build, adapter) -> None:
    with pytest.raises(ValueError, match=r"not in the teacher: head\.classification_head\.conv\.3"):
        inherit_neck_and_head(build("fcos", head_convs=2), build("fcos", head_convs=1), adapter)


@pytest.mark.usefixtures("single_thread")
def test_a_run_with_inherit_pairs_with_the_run_alone_and_resumes_its_own_weights(tmp_path, tiny_config) -> None:
    teacher_run = train(tiny_config(root=tmp_path / "teacher", model__backbone="resnet34", train__steps=2),
                        resume=False, progress=False, log=lambda _m: None)
    ckpt = str(teacher_run.run_dir / "checkpoints" / "last.pt")
    alone = build_run(tiny_config(root=tmp_path / "alone", seed=3), resume=False, log=lambda _m: None)
    rng_alone = torch.get_rng_state()
    lines: list[str] = []
    cfg = tiny_config(root=tmp_path / "inherit", seed=3, teacher={"checkpoint": ckpt, "inherit": True})
    run = build_run(cfg, resume=False, log=lines.append)
    assert torch.equal(torch.get_rng_state(), rng_alone)
    assert any(line.startswith("inherited the teacher's neck and head") for line in lines)
    assert run.distiller is None  # inheriting alone needs no KD term
    t_state = restore_model(ckpt).model.state_dict()  # the EMA weights the teacher distils with
    for k, v in run.model.state_dict().items():
        expected = alone.model.state_dict()[k] if k.startswith("backbone.body.") else t_state[k]
        assert torch.equal(v, expected), k
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in run.ema.module.state_dict().items())
    a, b = next(iter(alone.loader)), next(iter(run.loader))
    assert all(torch.equal(p, q) for p, q in zip(a.images, b.images))

    # A resumed run loads its own checkpoint and does not inherit again.
    done = train(cfg, resume=False, progress=False, log=lambda _m: None)
    saved = load_checkpoint(done.run_dir / "checkpoints" / "last.pt")["model"]
    lines.clear()
    resumed = build_run(cfg, resume=True, log=lines.append)
    assert not any(line.startswith("inherited") for line in lines)
    assert all(torch.equal(v, saved[k]) for k, v in resumed.model.state_dict().items())
