from collections import OrderedDict

import pytest
import torch

from detdistill.models.pafpn import PAFPN, BackboneWithPAFPN, build_yolo_pafpn_fcos


def _inputs(n: int = 2, h: int = 64, w: int = 96) -> OrderedDict:
    return OrderedDict(
        [
            ("0", torch.randn(n, 16, h // 8, w // 8)),
            ("1", torch.randn(n, 24, h // 16, w // 16)),
            ("2", torch.randn(n, 40, h // 32, w // 32)),
        ]
    )


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_pafpn_shapes_and_hooks(norm: str) -> None:
    torch.manual_seed(0)
    neck = PAFPN([16, 24, 40], out_channels=32, num_blocks=1, norm=norm)
    x = _inputs()
    seen: dict[str, torch.Size] = {}
    handles = []
    for group in ("fpn_outs", "pan_outs"):
        for i in range(3):
            name = f"{group}.{i}"
            mod = neck.get_submodule(name)
            handles.append(mod.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o.shape)))
    out = neck(x)
    for h in handles:
        h.remove()
    assert list(out.keys()) == ["0", "1", "2"]
    for i, stride in enumerate([8, 16, 32]):
        expected = torch.Size([2, 32, 64 // stride, 96 // stride])
        assert out[str(i)].shape == expected
        assert seen[f"fpn_outs.{i}"] == expected  # teacher and student match at every scale
        assert seen[f"pan_outs.{i}"] == expected
    # Distinct modules: the stride-8 PAN output is not the FPN output.
    assert neck.fpn_outs[0] is not neck.pan_outs[0]


def test_pafpn_odd_sizes() -> None:
    # ResNet rounds up at each stride: 100 -> 13 / 7 / 4.
    neck = PAFPN([8, 8, 8], out_channels=32)
    x = OrderedDict([("0", torch.randn(1, 8, 13, 13)), ("1", torch.randn(1, 8, 7, 7)), ("2", torch.randn(1, 8, 4, 4))])
    out = neck(x)
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(13, 13), (7, 7), (4, 4)]


def test_backbone_with_pafpn_attrs() -> None:
    model = build_yolo_pafpn_fcos("resnet18", num_classes=3, neck_channels=32, min_size=64, max_size=64)
    bb = model.backbone
    assert isinstance(bb, BackboneWithPAFPN)
    assert bb.out_channels == 32
    for i in range(3):
        model.get_submodule(f"backbone.neck.fpn_outs.{i}")
        model.get_submodule(f"backbone.neck.pan_outs.{i}")
    out = bb(torch.randn(1, 3, 64, 64))
    assert [tuple(v.shape) for v in out.values()] == [(1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]


def test_build_yolo_pafpn_fcos_train_and_eval() -> None:
    torch.manual_seed(0)
    model = build_yolo_pafpn_fcos("resnet18", num_classes=4, neck_channels=32, head_convs=1, min_size=128, max_size=128)
    images = list(torch.rand(2, 3, 128, 128))
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 30.0, 110.0, 100.0]]), "labels": torch.tensor([3])},
    ]
    fpn_seen = []
    h = model.get_submodule("backbone.neck.fpn_outs.0").register_forward_hook(lambda m, a, o: fpn_seen.append(o))
    model.train()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    h.remove()
    assert fpn_seen and fpn_seen[0].shape == (2, 32, 16, 16)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2 and set(dets[0]) >= {"boxes", "scores", "labels"}


def test_build_rejects_bad_args() -> None:
    with pytest.raises(ValueError):
        build_yolo_pafpn_fcos("vgg", num_classes=2)
    with pytest.raises(ValueError):
        build_yolo_pafpn_fcos("resnet18", num_classes=2, neck_channels=48)
