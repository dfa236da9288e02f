"""TorchvisionAdapter: every architecture builds, trains a step, predicts, exposes taps,
loads local weights, and exports a checkpoint that plain torchvision loads without detdistill."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from detdistill.adapters.base import get_adapter
from detdistill.config import ModelConfig, TrainConfig
from detdistill.engine.optim import build_optimizer, build_scheduler
from detdistill.engine.train import train_one_step
from detdistill.models import torchvision_detectors
from detdistill.structures import Batch, Target

pytestmark = pytest.mark.usefixtures("single_thread")

ADAPTER = get_adapter("torchvision")
ARCHS = ADAPTER.archs()
NUM_CLASSES = 3
FPN = 32


def _cfg(arch: str, **kw) -> ModelConfig:
    # torchvision's RetinaNetHead has a fixed depth of 4; everything else uses the cheapest head.
    base = dict(arch=arch, backbone="resnet18", fpn_channels=FPN, head_convs=4 if arch == "retinanet" else 1)
    return ModelConfig(**{**base, **kw})


def _build(arch: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ADAPTER.build(_cfg(arch, **kw), NUM_CLASSES)


def _batch(size: int = 128) -> Batch:
    g = torch.Generator().manual_seed(7)
    images = [torch.rand(3, size, size, generator=g) for _ in range(2)]
    targets = [
        Target(torch.tensor([[10.0, 12.0, 50.0, 44.0], [64.0, 60.0, 120.0, 126.0]]), torch.tensor([0, 2]), 0),
        Target(torch.tensor([[30.0, 30.0, 70.0, 90.0]]), torch.tensor([1]), 1),
    ]
    return Batch(images, targets)


def _step(model: torch.nn.Module, batch: Batch) -> dict[str, float]:
    tcfg = TrainConfig(lr=0.01, warmup_steps=0, steps=10)
    opt = build_optimizer(tcfg, list(model.parameters()))
    return train_one_step(model, ADAPTER, batch, 0, optimizer=opt, scheduler=build_scheduler(tcfg, opt),
                          grad_clip=tcfg.grad_clip)


# ----------------------------------------------------------------------------- every arch
@pytest.mark.parametrize("arch", ARCHS)
def test_build_train_step_predict_and_taps(arch):
    model = _build(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    seen_labels: list[torch.Tensor] = []
    if arch == "fasterrcnn":  # labels as torchvision's ROI heads receive them (0 = background)
        model.roi_heads.register_forward_pre_hook(
            lambda _m, args: seen_labels.extend(t["labels"] for t in (args[3] or [])))

    batch = _batch()
    values = _step(model, batch)
    assert values["loss"] > 0 and all(math.isfinite(v) for v in values.values()), values
    assert any(k.startswith("loss/") for k in values)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    # Every weight tensor that got a gradient moved (1-d norm/bias parameters may get updates
    # below float32 resolution of their value, so they are not required to).
    weights = {n for n, p in model.named_parameters() if p.ndim > 1 and p.grad is not None and p.grad.abs().sum() > 0}
    assert len(weights) > 10 and weights <= changed, sorted(weights - changed)[:5]
    assert any(n.startswith(("head.", "roi_heads.")) for n in changed)
    if arch == "fasterrcnn":
        assert [t.tolist() for t in seen_labels] == [[1, 3], [2]]  # contiguous labels shifted by one

    # predict: eval mode inside, boxes in the image frame, contiguous labels.
    h, w = 160, 192  # > 128 px: a 1x1 P7 map trips the single-image GroupNorm check at FPN width 32
    images = [torch.rand(3, h, w), torch.rand(3, h, w)]
    model.train()
    dets = ADAPTER.predict(model, images)
    assert model.training, "predict must restore the training flag"
    assert len(dets) == 2
    for d in dets:
        assert d.boxes.shape[1:] == (4,) and len(d.boxes) == len(d.scores) == len(d.labels)
        assert d.boxes.dtype == torch.float32 and d.labels.dtype == torch.int64
        if len(d.boxes):
            assert (d.boxes[:, 0] >= 0).all() and (d.boxes[:, 1] >= 0).all()
            assert (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
            assert (d.boxes[:, 2] >= d.boxes[:, 0]).all() and (d.boxes[:, 3] >= d.boxes[:, 1]).all()
            assert d.labels.min() >= 0 and d.labels.max() < NUM_CLASSES
            assert ((d.scores >= 0) & (d.scores <= 1)).all()

    taps = ADAPTER.taps(model)
    necks = {k: v for k, v in taps.items() if k.startswith("neck.")}
    assert "neck.p3" in necks and "neck.p5" in necks
    for name, info in taps.items():
        assert info.name == name and info.module
        model.get_submodule(info.module)  # a real module path of the unwrapped model
    for info in necks.values():
        assert info.channels == FPN and info.stride > 0
    assert necks["neck.p3"].stride == 8 and necks["neck.p5"].stride == 32
    layers = [taps[f"backbone.layer{k}"] for k in (2, 3, 4)]
    assert [t.stride for t in layers] == [8, 16, 32] and all(t.channels > 0 for t in layers)
    if arch == "yolo_pafpn":
        for lvl, stride in ((3, 8), (4, 16), (5, 32)):
            assert taps[f"fpn.p{lvl}"].stride == taps[f"pan.p{lvl}"].stride == stride


def test_fasterrcnn_predict_maps_torchvision_labels_back():
    """torchvision label k+1 (0 = background) must come back as contiguous label k."""
    model = _build("fasterrcnn").eval()
    cls = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls.weight.zero_()
        cls.bias.copy_(torch.tensor([-20.0, -20.0, -20.0, 20.0]))  # background, 1, 2, 3: last class wins
    dets = ADAPTER.predict(model, [torch.rand(3, 160, 160)])[0]
    assert len(dets.labels) > 0 and set(dets.labels.tolist()) == {NUM_CLASSES - 1}


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_round_trip_through_safetensors(arch, tmp_path):
    src = _build(arch, seed=1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = ADAPTER.build(_cfg(arch, weights=str(path)), NUM_CLASSES)
    fresh = _build(arch, seed=2).state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the weights did something: a differently seeded build differs
    assert any(not torch.equal(fresh[k], v) for k, v in src.state_dict().items() if v.is_floating_point())


def test_wrong_weights_name_missing_unexpected_and_misshaped_keys(tmp_path):
    state = {k: v.contiguous() for k, v in _build("fcos").state_dict().items()}
    del state["head.classification_head.cls_logits.bias"]
    state["bogus.layer.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as err:
        ADAPTER.build(_cfg("fcos", weights=str(path)), NUM_CLASSES)
    msg = str(err.value)
    assert "bad.safetensors" in msg
    assert "missing" in msg and "head.classification_head.cls_logits.bias" in msg
    assert "bogus.layer.weight" in msg

    with pytest.raises(ValueError, match="shape mismatch.*cls_logits"):  # 3-class weights, 5-class model
        torch.manual_seed(0)
        good = tmp_path / "good.safetensors"
        save_file({k: v.contiguous() for k, v in _build("fcos").state_dict().items()}, str(good))
        ADAPTER.build(_cfg("fcos", weights=str(good)), 5)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ADAPTER.build(_cfg("fcos", weights=str(tmp_path / "nope.safetensors")), NUM_CLASSES)


# ----------------------------------------------------------------------------- export
# yolo_pafpn with GroupNorm: its loader ships the PAFPN source and must honour model.norm.
EXPORTED = [("fcos", {}), ("retinanet", {}), ("fasterrcnn", {}), ("yolo_pafpn", {"norm": "gn"})]
_PLAIN_RUNNER = r'''
import runpy, sys
from pathlib import Path

sys.modules["detdistill"] = None  # any `import detdistill` now raises ImportError
try:
    import detdistill  # noqa: F401
except ImportError:
    print("detdistill blocked")
else:
    raise SystemExit("detdistill is importable in the plain-torchvision subprocess")

import torch
from safetensors.torch import load_file, save_file

image = load_file(sys.argv[1])["image"]
for folder in map(Path, sys.argv[2:]):
    runpy.run_path(str(folder / "load_model.py"), run_name="__main__")  # `python load_model.py`
    model = runpy.run_path(str(folder / "load_model.py"))["load"](folder)
    assert not model.training
    # No adjustment: load() installs a no-resize transform, so the plain torchvision model runs
    # at native resolution like detdistill (torchvision's own would upscale this image 5x).
    with torch.no_grad():
        out = model([image])[0]
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "plain_out.safetensors"))
    assert not any(m.startswith("detdistill") for m in sys.modules if sys.modules[m] is not None)
print("ok")
'''


def test_export_loads_in_plain_torchvision_with_identical_outputs(tmp_path):
    image = torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(3))
    save_file({"image": image}, str(tmp_path / "image.safetensors"))
    expected = {}
    folders = []
    for arch, extra in EXPORTED:
        cfg = _cfg(arch, score_thresh=0.0, detections_per_img=20, **extra)  # threshold 0: non-empty outputs
        torch.manual_seed(0)
        model = ADAPTER.build(cfg, NUM_CLASSES)
        _step(model, _batch())  # a trained model: weights and BatchNorm running stats moved
        out_dir = tmp_path / f"export_{arch}"
        weights = ADAPTER.export(model, cfg, NUM_CLASSES, out_dir)
        assert weights == out_dir / "model.safetensors" and (out_dir / "model.json").is_file()
        loader = (out_dir / "load_model.py").read_text()
        assert "import detdistill" not in loader and "from detdistill" not in loader
        # the loader is the package's own builder module, copied: the code that trained it
        assert loader == Path(torchvision_detectors.__file__).read_text()
        assert set(load_file(str(weights))) == set(model.state_dict())
        expected[arch] = ADAPTER.predict(model, [image])[0]
        folders.append(out_dir)

    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pp = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not p.startswith(src)]
    if pp:
        env["PYTHONPATH"] = os.pathsep.join(pp)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # same kernels as this process
    runner = tmp_path / "run_plain.py"
    runner.write_text(_PLAIN_RUNNER)
    proc = subprocess.run([sys.executable, str(runner), str(tmp_path / "image.safetensors"), *map(str, folders)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "detdistill blocked" in proc.stdout
    assert proc.stdout.count("FCOS loaded") == 2  # fcos and yolo_pafpn (an FCOS on a PAFPN neck)
    assert "RetinaNet loaded" in proc.stdout and "FasterRCNN loaded" in proc.stdout

    for (arch, _), folder in zip(EXPORTED, folders):
        plain = load_file(str(folder / "plain_out.safetensors"))
        ours = expected[arch]
        assert len(ours.boxes) > 0, arch
        shift = 1 if arch == "fasterrcnn" else 0
        assert plain["labels"].tolist() == (ours.labels + shift).tolist(), arch
        torch.testing.assert_close(plain["boxes"], ours.boxes, rtol=0, atol=1e-4, msg=arch)
        torch.testing.assert_close(plain["scores"], ours.scores, rtol=0, atol=1e-5, msg=arch)


# ----------------------------------------------------------------------------- config errors
def test_retinanet_head_convs_must_be_four():
    with pytest.raises(ValueError, match="head_convs.*fixed depth of 4"):
        ADAPTER.build(ModelConfig(arch="retinanet", backbone="resnet18", fpn_channels=FPN, head_convs=2), NUM_CLASSES)


def test_fcos_fpn_channels_must_be_multiple_of_32():
    with pytest.raises(ValueError, match="fpn_channels=48.*multiple of 32"):
        ADAPTER.build(ModelConfig(arch="fcos", backbone="resnet18", fpn_channels=48, head_convs=1), NUM_CLASSES)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError) as err:
        ADAPTER.build(ModelConfig(arch="detr", backbone="resnet18", fpn_channels=FPN), NUM_CLASSES)
    assert "'detr'" in str(err.value) and all(a in str(err.value) for a in ARCHS)
    with pytest.raises(ValueError) as err:
        ADAPTER.build(ModelConfig(arch="fcos", backbone="resnet101", fpn_channels=FPN), NUM_CLASSES)
    assert "'resnet101'" in str(err.value)
    assert all(b in str(err.value) for b in ("resnet18", "resnet34", "resnet50"))
    with pytest.raises(KeyError, match="no_such_framework.*torchvision"):
        get_adapter("no_such_framework")
    with pytest.raises(ValueError, match="num_classes"):
        ADAPTER.build(_cfg("fcos"), 0)


def test_reg_bias_init_sets_the_fcos_box_bias_and_is_refused_elsewhere():
    from detdistill.config import ModelConfig

    adapter = get_adapter("torchvision")
    for arch in ("fcos", "yolo_pafpn"):
        model = adapter.build(ModelConfig(arch=arch, fpn_channels=32, head_convs=1, reg_bias_init=1.0), 2)
        assert torch.all(model.head.regression_head.bbox_reg.bias == 1.0)
    default = adapter.build(ModelConfig(arch="fcos", fpn_channels=32, head_convs=1), 2)
    assert torch.all(default.head.regression_head.bbox_reg.bias == 0.0)  # torchvision's own init
    with pytest.raises(ValueError, match="reg_bias_init applies to FCOS"):
        adapter.build(ModelConfig(arch="retinanet", fpn_channels=32, reg_bias_init=1.0), 2)


@pytest.mark.parametrize("arch", ["fcos", "yolo_pafpn"])
def test_a_32_channel_fcos_head_trains_on_one_tiny_image(arch):
    """P7 of a 64 px image is 1x1; GroupNorm(32, 32) would see one value per group and raise."""
    model = _build(arch, fpn_channels=32)
    norms = [m for m in model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups == 2 for m in norms)
    model.train()
    target = Target(torch.tensor([[10.0, 12.0, 40.0, 44.0]]), torch.tensor([1]), 0, "tiny")
    losses, _ = ADAPTER.forward_train(model, Batch([torch.rand(3, 64, 64)], [target]))
    assert all(torch.isfinite(v) for v in losses.values())
    wide = _build("fcos", fpn_channels=64)  # torchvision's head untouched where it works
    assert all(m.num_groups == 32 for m in wide.head.modules() if isinstance(m, torch.nn.GroupNorm))


def test_a_frozen_loss_term_is_reported(capsys):
    from detdistill.engine.train import _warn_stuck_terms

    history: dict = {}
    warned: set = set()
    lines: list[str] = []
    for step in range(1, 7):
        _warn_stuck_terms({"loss/bbox_regression": 1.0, "loss/classification": 1.0 / step}, history, warned, step * 10,
                          lines.append)
    assert len(lines) == 1 and "loss/bbox_regression" in lines[0] and "reg_bias_init" in lines[0]


def test_a_dead_box_branch_is_reported_although_its_loss_is_not_exactly_constant():
    """The aerial-cars student's window means while its box branch was dead (tune bench, L2 seed 101,
    torchvision's zero bias): they wander in the fourth decimal; a live term's means move by per cents."""
    from detdistill.engine.train import _warn_stuck_terms

    dead = [1.000262, 1.000114, 1.00018, 1.000104, 1.000092, 1.000061]
    live = [0.982, 0.552, 0.436, 0.426, 0.437, 0.425]
    history: dict = {}
    warned: set = set()
    lines: list[str] = []
    for k, (d, c) in enumerate(zip(dead, live), start=1):
        _warn_stuck_terms({"loss/bbox_regression": d, "loss/classification": c}, history, warned, k * 10, lines.append)
    assert len(lines) == 1 and "step 50: loss/bbox_regression" in lines[0]
    # A slow but real plateau (0.3 % per window) is not called dead.
    history, lines = {}, []
    for k in range(1, 10):
        _warn_stuck_terms({"loss/bbox_regression": 0.5 * (1 - 3e-3) ** k}, history, set(), k * 10, lines.append)
    assert lines == []


def test_a_term_before_its_start_is_not_called_dead_but_one_that_never_starts_is_named():
    from detdistill.engine.train import _warn_never_started, _warn_stuck_terms

    history: dict = {}
    warned: set = set()
    started: set = set()
    lines: list[str] = []
    for step in range(1, 9):  # csa starts in window 7; cls never does
        means = {"loss/kd/scalekd/csa": 0.0 if step < 7 else 0.1 / step, "loss/kd/scalekd/cls": 0.0,
                 "loss/classification": 1.0 / step}
        _warn_stuck_terms(means, history, warned, step * 10, lines.append, started=started)
    assert lines == []  # zeros before a start step are not a dead branch
    _warn_never_started(history, started, lines.append)
    assert len(lines) == 1 and "loss/kd/scalekd/cls" in lines[0] and "exactly 0 for the whole run" in lines[0]


def test_a_runaway_kd_term_is_named_once():
    from detdistill.engine.train import _warn_runaway_terms

    warned: set = set()
    lines: list[str] = []
    # The normalised SDF of the ScaleKD bench, steps 10 and 70: 1.18 and 8.9e6 against ~2.1-2.7.
    _warn_runaway_terms({"loss/classification": 1.0, "loss/bbox_regression": 1.0, "loss/bbox_ctrness": 0.69,
                         "loss/kd/scalekd/feat": 1.18}, warned, 10, lines.append)
    assert lines == []
    for step in (70, 80):
        _warn_runaway_terms({"loss/classification": 0.45, "loss/bbox_regression": 0.98, "loss/bbox_ctrness": 0.69,
                             "loss/kd/scalekd/feat": 8.9e6}, warned, step, lines.append)
    assert len(lines) == 1 and "loss/kd/scalekd/feat" in lines[0] and "step 70" in lines[0]
    assert "4198113x the detection loss" in lines[0]
