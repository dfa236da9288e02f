import math

import pytest
import torch

from detdistill.losses.gaussian_mask import assign_levels, centernet_radius, gaussian_masks
from detdistill.losses.mssd import MSSDLoss, mssd_mask_loss, mssd_self_distill_loss

STRIDES = (8, 16, 32)


def _outside_union(boxes: torch.Tensor, stride: int, hw: tuple[int, int]) -> torch.Tensor:
    """Cells whose centre lies outside every box: (H_l, W_l) bool."""
    h, w = hw
    ys = (torch.arange(h) + 0.5) * stride
    xs = (torch.arange(w) + 0.5) * stride
    inside = torch.zeros(h, w, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.tolist():
        inside |= ((ys >= y1) & (ys <= y2))[:, None] & ((xs >= x1) & (xs <= x2))[None, :]
    return ~inside


@pytest.mark.parametrize("mode", ["centernet", "box_fraction"])
def test_peak_at_centre_and_zero_outside(mode: str) -> None:
    # 60x50 box (sqrt(area)=54.8 -> stride 16), centre (77, 63) falls between cell centres.
    boxes = torch.tensor([[47.0, 38.0, 107.0, 88.0]])
    masks = gaussian_masks([boxes], (160, 192), STRIDES, sigma_mode=mode)
    assert [tuple(m.shape) for m in masks] == [(1, 1, 20, 24), (1, 1, 10, 12), (1, 1, 5, 6)]
    m = masks[1][0, 0]
    cy, cx = int(63 // 16), int(77 // 16)
    assert m[cy, cx].item() == 1.0  # exactly, not approximately
    assert m.max().item() == 1.0
    assert (m[_outside_union(boxes, 16, (10, 12))] == 0).all()
    assert (m >= 0).all() and (m[~_outside_union(boxes, 16, (10, 12))] > 0).all()
    assert masks[0].abs().sum() == 0 and masks[2].abs().sum() == 0


def test_scale_assignment() -> None:
    small = torch.tensor([10.0, 10.0, 30.0, 30.0])  # 20 px -> stride 8
    medium = torch.tensor([100.0, 20.0, 160.0, 80.0])  # 60 px -> stride 16
    large = torch.tensor([40.0, 90.0, 190.0, 240.0])  # 150 px -> stride 32
    boxes = torch.stack([small, medium, large])
    assert assign_levels(boxes, (32.0, 96.0)).tolist() == [0, 1, 2]
    # Thresholds are half-open: exactly 32 px goes to the medium map.
    assert assign_levels(torch.tensor([[0.0, 0.0, 32.0, 32.0]]), (32.0, 96.0)).tolist() == [1]
    masks = gaussian_masks([boxes], (256, 256), STRIDES, sigma_mode="box_fraction")
    for lvl, (stride, own) in enumerate(zip(STRIDES, boxes)):
        m = masks[lvl][0, 0]
        hw = tuple(m.shape)
        # Nonzero only inside the box this scale owns.
        assert (m[_outside_union(own[None], stride, hw)] == 0).all()
        assert m.max().item() == 1.0
        cx, cy = ((own[0] + own[2]) / 2).item(), ((own[1] + own[3]) / 2).item()
        assert m[int(cy // stride), int(cx // stride)].item() == 1.0


def test_overlap_uses_max() -> None:
    a = torch.tensor([[16.0, 16.0, 80.0, 80.0]])
    b = torch.tensor([[40.0, 24.0, 100.0, 84.0]])
    ma = gaussian_masks([a], (128, 128), STRIDES, sigma_mode="box_fraction")[1]
    mb = gaussian_masks([b], (128, 128), STRIDES, sigma_mode="box_fraction")[1]
    mab = gaussian_masks([torch.cat([a, b])], (128, 128), STRIDES, sigma_mode="box_fraction")[1]
    assert torch.equal(mab, torch.maximum(ma, mb))
    assert ((ma > 0) & (mb > 0)).any()  # they really overlap


def test_batch_and_tiny_and_empty_boxes() -> None:
    tiny = torch.tensor([[9.0, 9.0, 11.0, 11.0]])  # covers no cell centre at stride 8
    masks = gaussian_masks([tiny, torch.zeros(0, 4)], (64, 64), STRIDES)
    assert masks[0][0, 0, 1, 1].item() == 1.0 and (masks[0][0] > 0).sum() == 1
    assert masks[0][1].abs().sum() == 0


def test_centernet_radius_satisfies_iou() -> None:
    w, h = torch.tensor([4.0, 10.0, 3.0]), torch.tensor([4.0, 6.0, 12.0])
    r = centernet_radius(w, h, 0.7)
    assert (r > 0).all()
    # Case 3 (box grown by r on each side) hits IoU exactly 0.7 or the bound is tighter.
    iou_grow = w * h / ((w + 2 * r) * (h + 2 * r))
    iou_shrink = (w - 2 * r) * (h - 2 * r) / (w * h)
    inter = (w - r) * (h - r)
    iou_shift = inter / (2 * w * h - inter)
    for iou in (iou_grow, iou_shrink, iou_shift):
        assert (iou >= 0.7 - 1e-5).all()
    assert torch.isclose(torch.stack([iou_grow, iou_shrink, iou_shift]).min(0).values, torch.tensor(0.7)).all()


def test_self_distill_detaches_fpn() -> None:
    fpn = torch.randn(2, 4, 5, 5, requires_grad=True)
    pan = torch.randn(2, 4, 5, 5, requires_grad=True)
    mask = torch.rand(2, 1, 5, 5)
    for m in (None, mask):
        fpn.grad = pan.grad = None
        mssd_self_distill_loss(fpn, pan, m).backward()
        assert fpn.grad is None or fpn.grad.abs().sum() == 0
        assert pan.grad is not None and pan.grad.abs().sum() > 0


def test_self_distill_values() -> None:
    torch.manual_seed(0)
    fpn, pan = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(mssd_self_distill_loss(fpn, pan), ((pan - fpn) ** 2).mean())
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 1, 2] = 1.0
    mask[1, 0, 3, 0] = 0.5
    # Hand computation: weighted mean over the masked positions' channel errors.
    e1 = ((pan[0, :, 1, 2] - fpn[0, :, 1, 2]) ** 2).sum()
    e2 = ((pan[1, :, 3, 0] - fpn[1, :, 3, 0]) ** 2).sum()
    expected = (1.0 * e1 + 0.5 * e2) / (3 * (1.5 + 1e-6))
    assert torch.allclose(mssd_self_distill_loss(fpn, pan, mask, weighting_mean="mask"), expected)
    # the default averages over every cell instead: the same weighted sum over 2 * 3 * 4 * 4 elements
    assert torch.allclose(mssd_self_distill_loss(fpn, pan, mask), (1.0 * e1 + 0.5 * e2) / 96)
    for mean in ("mask", "map"):
        assert mssd_self_distill_loss(fpn, pan, torch.zeros(2, 1, 4, 4), weighting_mean=mean).item() == 0.0
    a, t = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    assert torch.allclose(mssd_mask_loss(a, t), ((a - t) ** 2).mean())


def test_map_mean_weighting_is_the_plain_mse_of_the_masked_error_and_never_amplifies() -> None:
    """``weighting_mean="map"`` divides by every cell, so it equals ``mean(mask * (pan - fpn)^2)``
    and stays under the plain MSE; ``"mask"`` divides by the mask mass, so shrinking the objects
    (a smaller mask) leaves its value but multiplies its per-cell gradient, the blow-up measured
    on aerial-cars (docs/benchmarks.md, "MSSD ablation")."""
    torch.manual_seed(0)
    fpn, pan = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8, requires_grad=True)
    big, small = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    big[:, :, 2:6, 2:6] = 1.0   # 25 % of the cells
    small[:, :, 3:4, 3:4] = 1.0  # 1 / 64 of the cells
    got = mssd_self_distill_loss(fpn, pan, big, weighting_mean="map")
    torch.testing.assert_close(got, (big * (pan - fpn) ** 2).mean())
    assert got <= mssd_self_distill_loss(fpn, pan)
    (g_small,) = torch.autograd.grad(mssd_self_distill_loss(fpn, pan, small, weighting_mean="mask"), pan)
    (g_plain,) = torch.autograd.grad(mssd_self_distill_loss(fpn, pan), pan)
    (g_map,) = torch.autograd.grad(mssd_self_distill_loss(fpn, pan, small, weighting_mean="map"), pan)
    cell = (slice(None), slice(None), 3, 3)
    # per cell, "mask" scales the plain MSE's gradient by the inverse mask fraction (64 here); "map" leaves it
    torch.testing.assert_close(g_small[cell], 64 * g_plain[cell], rtol=1e-4, atol=0)
    torch.testing.assert_close(g_map[cell], g_plain[cell])
    with pytest.raises(ValueError, match="weighting_mean"):
        mssd_self_distill_loss(fpn, pan, small, weighting_mean="objects")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weighting_mean"):
        MSSDLoss(channels=3, weighting_mean="cells")  # type: ignore[arg-type]


@pytest.mark.parametrize("use_mask", [True, False])
def test_mssd_loss_module(use_mask: bool) -> None:
    torch.manual_seed(0)
    crit = MSSDLoss(channels=8, scale_weights=(1.0, 0.5, 0.25), mask_weight=2.0, use_mask_weighting=use_mask,
                    weighting_mean="mask")
    names = {n for n, _ in crit.named_parameters()}
    assert names == {f"adapters.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    assert all(tuple(crit.adapters[i].weight.shape) == (1, 8, 1, 1) for i in range(3))
    H = W = 128
    shapes = [(math.ceil(H / s), math.ceil(W / s)) for s in STRIDES]
    fpn = [torch.randn(2, 8, h, w, requires_grad=True) for h, w in shapes]
    pan = [torch.randn(2, 8, h, w, requires_grad=True) for h, w in shapes]
    boxes = [torch.tensor([[10.0, 10.0, 30.0, 30.0], [20.0, 30.0, 120.0, 127.0]]), torch.tensor([[40.0, 40.0, 90.0, 100.0]])]
    out = crit(fpn, pan, boxes, (H, W))
    assert set(out) == {"mssd_self", "mssd_mask"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    sum(out.values()).backward()
    assert all(f.grad is None for f in fpn)
    assert all(p.grad is not None for p in pan)
    assert all(p.grad is not None for p in crit.parameters())
    # Independent float64 computation of both terms from the same masks and adapter weights.
    masks = [m.double() for m in gaussian_masks(boxes, (H, W), STRIDES, sigma_mode="box_fraction")]
    assert all(float(m.sum()) > 0 for m in masks)
    self_want, mask_want = 0.0, 0.0
    for w, f, p, m, conv in zip((1.0, 0.5, 0.25), fpn, pan, masks, crit.adapters):
        f, p = f.detach().double(), p.detach().double()
        sq = (p - f) ** 2
        self_want += w * (float((sq * m).sum() / (8 * (m.sum() + 1e-6))) if use_mask else float(sq.mean()))
        logits = torch.einsum("nchw,c->nhw", p, conv.weight.detach().double().view(-1)) + conv.bias.detach().double()
        mask_want += float(((torch.sigmoid(logits)[:, None] - m) ** 2).mean())
    assert float(out["mssd_self"].detach()) == pytest.approx(self_want, rel=1e-5)
    assert float(out["mssd_mask"].detach()) == pytest.approx(2.0 * mask_want, rel=1e-5)  # mask_weight 2
    # mask_weight scales the mask term only, linearly
    crit.mask_weight = 5.0
    again = crit(fpn, pan, boxes, (H, W))
    assert float(again["mssd_mask"].detach()) == pytest.approx(5.0 * mask_want, rel=1e-5)
    assert float(again["mssd_self"].detach()) == pytest.approx(self_want, rel=1e-6)
    # mask_weight 0 turns the mask term off: no part, no adapter run, the same self term
    crit.mask_weight = 0.0
    off = crit(fpn, pan, boxes, (H, W))
    assert set(off) == {"mssd_self"} and float(off["mssd_self"].detach()) == pytest.approx(self_want, rel=1e-6)
    crit.mask_weight = 5.0
    # weighting_mean "map" reaches the self term: the same float64 sums over every cell
    crit.weighting_mean = "map"
    map_want = sum(w * float(((p.detach().double() - f.detach().double()) ** 2 * m).mean() if use_mask else
                             ((p.detach().double() - f.detach().double()) ** 2).mean())
                   for w, f, p, m in zip((1.0, 0.5, 0.25), fpn, pan, masks))
    assert float(crit(fpn, pan, boxes, (H, W))["mssd_self"].detach()) == pytest.approx(map_want, rel=1e-5)


def test_mssd_loss_on_pafpn_fcos() -> None:
    """End to end: hook the neck of the FCOS builder and add MSSD to the detector loss."""
    from detdistill.models.pafpn import build_yolo_pafpn_fcos

    torch.manual_seed(0)
    model = build_yolo_pafpn_fcos("resnet18", num_classes=2, neck_channels=32, head_convs=1, min_size=64, max_size=64)
    feats: dict[str, torch.Tensor] = {}
    for g in ("fpn_outs", "pan_outs"):
        for i in range(3):
            model.get_submodule(f"backbone.neck.{g}.{i}").register_forward_hook(
                lambda m, a, o, k=f"{g}.{i}": feats.__setitem__(k, o)
            )
    crit = MSSDLoss(32)
    images = list(torch.rand(2, 3, 64, 64))
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 25.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    losses = model(images, targets)
    terms = crit([feats[f"fpn_outs.{i}"] for i in range(3)], [feats[f"pan_outs.{i}"] for i in range(3)],
                 [t["boxes"] for t in targets], (64, 64))
    total = sum(losses.values()) + sum(terms.values())
    assert torch.isfinite(total)
    total.backward()


def test_conv3x3_adapter_matches_an_independent_computation() -> None:
    """The nonlinear adaptation layer: shapes, gradients, and the mask term recomputed by hand."""
    torch.manual_seed(1)
    crit = MSSDLoss(channels=[4, 6, 8], adapter="conv3x3")
    for lvl, c in enumerate((4, 6, 8)):
        hidden, _, last = crit.adapters[lvl]
        assert tuple(hidden.weight.shape) == (c, c, 3, 3) and tuple(last.weight.shape) == (1, c, 1, 1)
        assert float(last.bias.detach()) == pytest.approx(math.log(0.01 / 0.99), rel=1e-6)  # starts near "all background"
    H = W = 64
    shapes = [(H // s, W // s) for s in STRIDES]
    fpn = [torch.randn(2, c, h, w) for c, (h, w) in zip((4, 6, 8), shapes)]
    pan = [torch.randn(2, c, h, w, requires_grad=True) for c, (h, w) in zip((4, 6, 8), shapes)]
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 22.0]]), torch.tensor([[10.0, 8.0, 60.0, 63.0]])]
    out = crit(fpn, pan, boxes, (H, W))
    sum(out.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pan)
    assert all(p.grad is not None for p in crit.parameters())
    masks = gaussian_masks(boxes, (H, W), STRIDES, sigma_mode="box_fraction")
    want = 0.0
    for p, m, (hidden, _, last) in zip(pan, masks, crit.adapters):
        x = p.detach().double()
        h = torch.nn.functional.conv2d(x, hidden.weight.detach().double(), hidden.bias.detach().double(), padding=1)
        logits = torch.einsum("nchw,c->nhw", h.clamp(min=0), last.weight.detach().double().view(-1)) + float(last.bias.detach())
        want += float(((torch.sigmoid(logits)[:, None] - m.double()) ** 2).mean())
    assert float(out["mssd_mask"].detach()) == pytest.approx(want, rel=1e-5)


def test_unknown_adapter_is_named() -> None:
    with pytest.raises(ValueError, match="adapter must be 'conv1x1' or 'conv3x3', got 'mlp'"):
        MSSDLoss(channels=8, adapter="mlp")  # type: ignore[arg-type]
