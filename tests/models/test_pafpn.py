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


def _hooked(neck: PAFPN, x: OrderedDict) -> tuple[OrderedDict, dict[str, torch.Tensor]]:
    seen: dict[str, torch.Tensor] = {}
    handles = [neck.get_submodule(f"{g}.{i}").register_forward_hook(
        lambda _m, _a, o, k=f"{g}.{i}": seen.__setitem__(k, o)) for g in ("fpn_outs", "pan_outs") for i in range(3)]
    try:
        out = neck(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_pafpn_values_follow_the_documented_data_flow(norm: str) -> None:
    """The neck's outputs equal the YOLOv5 PAFPN recomputed here from its blocks: top-down
    with 2x nearest upsampling and concatenation, then bottom-up with the stride-2 convs."""
    torch.manual_seed(0)
    neck = PAFPN([16, 24, 40], out_channels=32, num_blocks=1, norm=norm).eval()
    x = _inputs()
    out, seen = _hooked(neck, x)
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
    with torch.no_grad():
        f5 = neck.fpn_outs[2](x["2"])
        f4 = neck.fpn_outs[1](torch.cat([up(f5), x["1"]], 1))
        f3 = neck.fpn_outs[0](torch.cat([up(f4), x["0"]], 1))
        p3 = neck.pan_outs[0](f3)
        p4 = neck.pan_outs[1](torch.cat([neck.downs[0](p3), f4], 1))
        p5 = neck.pan_outs[2](torch.cat([neck.downs[1](p4), f5], 1))
    for name, want in (("fpn_outs.0", f3), ("fpn_outs.1", f4), ("fpn_outs.2", f5),
                       ("pan_outs.0", p3), ("pan_outs.1", p4), ("pan_outs.2", p5)):
        torch.testing.assert_close(seen[name], want, rtol=0, atol=0, msg=name)
    for key, want in zip(("0", "1", "2"), (p3, p4, p5)):
        torch.testing.assert_close(out[key], want, rtol=0, atol=0)


def test_pafpn_information_flows_top_down_then_bottom_up() -> None:
    """Changing the finest input (C3) leaves the coarser FPN maps alone (they are top-down only)
    but reaches every PAN map (the bottom-up path starts at stride 8); changing C5 reaches all."""
    torch.manual_seed(0)
    neck = PAFPN([16, 24, 40], out_channels=32, num_blocks=1, norm="gn").eval()
    x = _inputs()
    with torch.no_grad():
        _, base = _hooked(neck, x)
        x3 = OrderedDict(x)
        x3["0"] = x["0"] + torch.randn_like(x["0"])
        _, moved3 = _hooked(neck, x3)
        x5 = OrderedDict(x)
        x5["2"] = x["2"] + torch.randn_like(x["2"])
        _, moved5 = _hooked(neck, x5)
    changed3 = {k for k in base if not torch.equal(base[k], moved3[k])}
    changed5 = {k for k in base if not torch.equal(base[k], moved5[k])}
    assert changed3 == {"fpn_outs.0", "pan_outs.0", "pan_outs.1", "pan_outs.2"}
    assert changed5 == set(base)
