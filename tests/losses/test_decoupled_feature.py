import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detdistill.distill.methods import METHODS
from detdistill.losses.decoupled_feature import DecoupledL2Loss, box_foreground_mask, decoupled_l2_loss


def _pair(seed=0, shape=(2, 4, 8, 10)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def _mask_by_loops(boxes, input_size, map_size):
    """Independent rasterisation: a Python loop over cells and boxes, with the thin-box rule."""
    (H, W), (h, w) = input_size, map_size
    sy, sx = H / h, W / w
    out = np.zeros((len(boxes), h, w), dtype=bool)
    for n, bs in enumerate(boxes):
        for x1, y1, x2, y2 in bs.tolist():
            cols = [j for j in range(w) if x1 <= (j + 0.5) * sx <= x2] or [int((x1 + x2) / 2 // sx)]
            rows = [i for i in range(h) if y1 <= (i + 0.5) * sy <= y2] or [int((y1 + y2) / 2 // sy)]
            for i in rows:
                for j in cols:
                    out[n, i, j] = True
    return out


def test_registered_as_a_feature_method():
    assert METHODS.get("l2_decoupled").loss is DecoupledL2Loss
    assert METHODS.get("l2_decoupled").family == "feature"


def test_box_mask_matches_a_loop_over_cells_including_thin_and_empty():
    boxes = [torch.tensor([[0.0, 0.0, 31.0, 15.0], [40.0, 20.0, 43.0, 60.0], [70.0, 70.0, 71.0, 71.0]]),
             torch.zeros(0, 4)]
    got = box_foreground_mask(boxes, (80, 96), (10, 12))  # stride 8 both ways
    assert got.dtype == torch.bool and got.shape == (2, 10, 12)
    np.testing.assert_array_equal(got.numpy(), _mask_by_loops(boxes, (80, 96), (10, 12)))
    assert got[0, 8, 8] and got[0, 3, 5]  # the 1-px box keeps its centre cell; the 3-px-wide one its column
    assert not got[1].any()


def test_identical_maps_cost_nothing():
    s, _ = _pair()
    mask = torch.rand(2, 8, 10) > 0.7
    assert decoupled_l2_loss(s, s.clone(), mask).item() == 0.0


def test_each_region_is_the_mean_over_its_own_cells():
    s, t = _pair()
    mask = torch.rand(2, 8, 10, generator=torch.Generator().manual_seed(1)) > 0.8
    d = ((s - t) ** 2).mean(1)
    fg, bg = d[mask].mean(), d[~mask].mean()
    assert decoupled_l2_loss(s, t, mask, 1.0, 0.0).item() == pytest.approx(fg.item(), rel=1e-12)
    assert decoupled_l2_loss(s, t, mask, 0.0, 1.0).item() == pytest.approx(bg.item(), rel=1e-12)
    assert DecoupledL2Loss(2.0, 0.5)(s, t, mask).item() == pytest.approx(2 * fg.item() + 0.5 * bg.item(), rel=1e-12)
    # no foreground: the background term is plain L2, the foreground term 0 (not NaN)
    none = torch.zeros(2, 8, 10, dtype=torch.bool)
    assert decoupled_l2_loss(s, t, none).item() == pytest.approx(F.mse_loss(s, t).item(), rel=1e-12)
    assert decoupled_l2_loss(s, t, none, 1.0, 0.0).item() == 0.0


def test_foreground_only_sends_no_gradient_to_the_background_and_never_to_the_teacher():
    s, t = _pair()
    s.requires_grad_(True)
    t.requires_grad_(True)
    mask = torch.zeros(2, 8, 10, dtype=torch.bool)
    mask[0, 2:4, 3:6] = True
    decoupled_l2_loss(s, t, mask, 1.0, 0.0).backward()
    g = s.grad.abs().sum(1)
    assert (g[mask] > 0).all() and (g[~mask] == 0).all()
    assert t.grad is None


def test_bad_input_is_named():
    s, t = _pair()
    with pytest.raises(ValueError, match=r"foreground mask \(2, 8, 9\) does not fit maps \(2, 4, 8, 10\)"):
        decoupled_l2_loss(s, t, torch.zeros(2, 8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both 0"):
        DecoupledL2Loss(0.0, 0.0)
