"""The ultralytics YOLO adapter: build, train step, taps, early-exit features, predict, export, KD.

Runs whenever ultralytics is installed (the ``[yolo]`` extra); skipped otherwise. Every test
runs with the network refused and asserts that nothing even tried it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("ultralytics") is None:  # the core suite runs without the [yolo] extra
    pytest.importorskip("ultralytics")

from detdistill.config import DistillTermConfig, EvalConfig, ModelConfig  # noqa: E402
from detdistill.structures import Batch, Detections, Target  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


class NetworkGuard:
    """Refuses (and records) every DNS lookup and socket connection while installed."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._saved: list[tuple[object, str, object]] = []

    def _refuse(self, what: str):
        def refuse(*args, **kwargs):
            self.attempts.append(f"{what}{args[1:] if what.startswith('socket.') else args}")
            raise OSError(f"network access attempted in a test: {what}")

        return refuse

    def install(self) -> "NetworkGuard":
        for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
                            (socket, "getaddrinfo"), (socket, "gethostbyname")):
            self._saved.append((owner, name, getattr(owner, name)))
            label = f"socket.{name}" if owner is socket.socket else name
            setattr(owner, name, self._refuse(label))
        return self

    def remove(self) -> None:
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        self._saved.clear()


# Import the adapter (and with it ultralytics) with the network refused: the adapter must
# set YOLO_OFFLINE before ultralytics' import-time DNS probe.
_IMPORT_GUARD = NetworkGuard().install()
try:
    from detdistill.adapters.base import ADAPTERS, get_adapter  # noqa: E402
    from detdistill.adapters.ultralytics import UltralyticsAdapter  # noqa: E402
finally:
    _IMPORT_GUARD.remove()


@pytest.fixture(autouse=True)
def no_network():
    guard = NetworkGuard().install()
    try:
        yield guard
    finally:
        guard.remove()
    assert guard.attempts == [], f"network access attempted: {guard.attempts}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models on a shared, busy CPU: one intra-op thread is faster and steadier than several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adapter() -> UltralyticsAdapter:
    return get_adapter("ultralytics")


def _cfg(arch: str = "yolov8n", **kw) -> ModelConfig:
    return ModelConfig(framework="ultralytics", arch=arch, **kw)


def _batch(size: int = 64, n: int = 2) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = [Target(torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 18.0, 60.0, 52.0]]), torch.tensor([0, 2]), 1),
               Target(torch.tensor([[10.0, 10.0, 26.0, 22.0]]), torch.tensor([1]), 2)][:n]
    return Batch(images, targets)


def test_import_sets_offline_and_touches_no_network(adapter: UltralyticsAdapter) -> None:
    assert _IMPORT_GUARD.attempts == []
    assert os.environ.get("YOLO_OFFLINE") == "1"
    assert isinstance(adapter, UltralyticsAdapter) and "ultralytics" in ADAPTERS


def test_fresh_interpreter_import_is_offline(tmp_path: Path) -> None:
    """In a new process (ultralytics not yet imported, YOLO_OFFLINE unset) nothing probes the network."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import socket, sys
        tried = []
        def refuse(*a, **k):
            tried.append(a)
            raise OSError("blocked")
        socket.getaddrinfo = socket.create_connection = refuse
        socket.socket.connect = socket.socket.connect_ex = lambda self, *a: refuse(*a)
        import os, PIL.Image, torch
        from detdistill.adapters.base import get_adapter
        get_adapter("ultralytics")
        print("TRIED", len(tried))
        print("OMP", os.environ.get("OMP_NUM_THREADS"))
        print("PATCHED", PIL.Image.open.__module__, torch.save.__module__)
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_OFFLINE", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO / "src")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TRIED 0" in out.stdout
    # ultralytics' import-time patches that reach beyond it are undone
    assert "OMP None" in out.stdout
    assert "PATCHED PIL.Image torch.serialization" in out.stdout


def test_unreadable_image_raises_pil_error_without_install_attempt(tmp_path: Path) -> None:
    """ultralytics patches PIL.Image.open to pip-install pi-heif on unreadable files; the adapter undoes it."""
    import PIL.Image

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(PIL.UnidentifiedImageError):
        PIL.Image.open(bad)
    assert torch.save.__module__ == "torch.serialization"


def test_archs_and_build_yolov8n(adapter: UltralyticsAdapter) -> None:
    archs = adapter.archs()
    for a in ("yolov8n", "yolov8s", "yolo11n", "yolo11s"):
        assert a in archs
    assert not any(a.startswith(("yolo26", "yolov10")) for a in archs)  # end-to-end heads are not offered
    model = adapter.build(_cfg(), 3)
    head = model.model[-1]
    assert head.nc == 3 and list(head.f) == [15, 18, 21]
    assert model.yaml["scale"] == "n"
    assert (model.args.box, model.args.cls, model.args.dfl) == (7.5, 0.5, 1.5)
    with pytest.raises(ValueError, match="yolov8n"):
        adapter.build(_cfg("yolov8q"), 3)


def test_train_step_returns_separate_finite_terms_and_updates(adapter: UltralyticsAdapter) -> None:
    torch.manual_seed(0)
    model = adapter.build(_cfg(), 3).train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = _batch()
    losses, raw = adapter.forward_train(model, batch, need_raw=True)
    assert set(losses) == {"box", "cls", "dfl"}
    assert all(v.dim() == 0 and torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert float(losses["box"].detach()) > 0 and float(losses["cls"].detach()) > 0
    assert raw.cls_logits.shape == (2, 8 * 8 + 4 * 4 + 2 * 2, 3)
    assert raw.box_preds.shape == (2, 84, 64) and raw.box_format == "yolo_dfl"  # 4 x reg_max 16 DFL logits
    assert raw.input_size == (64, 64) and raw.image_sizes == [(64, 64), (64, 64)] and raw.strides == [8, 16, 32]
    assert [tuple(f.shape[-2:]) for f in raw.features] == [(8, 8), (4, 4), (2, 2)]
    # per batch: ultralytics' own criterion returns the same terms times the batch size
    from detdistill.adapters.ultralytics import _criterion, _targets

    ours = torch.stack([losses[k] for k in ("box", "cls", "dfl")]).detach()
    with torch.no_grad():
        theirs, _ = _criterion(model)(model(torch.stack(batch.images)), _targets(batch, (64, 64), torch.device("cpu")))
    torch.testing.assert_close(ours * 2, theirs, rtol=1e-4, atol=1e-4)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    changed = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert any(k.startswith("model.0.") for k in changed) and any(k.startswith("model.22.") for k in changed)
    # a batch without any box still gives finite terms
    empty = Batch(batch.images, [Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), i) for i in range(2)])
    losses, _ = adapter.forward_train(model, empty)
    assert all(torch.isfinite(v) for v in losses.values())


def test_targets_on_a_non_square_input_match_hand_computation() -> None:
    """ultralytics wants ``(cx, cy, w, h)`` normalised by the *padded input* width and height.
    A 64 (high) x 96 (wide) input with tall and wide boxes catches a cx/cy or w/h swap and
    a width/height mix-up, which a square image hides."""
    from detdistill.adapters.ultralytics import _targets

    batch = Batch([torch.zeros(3, 64, 96), torch.zeros(3, 64, 96)],
                  [Target(torch.tensor([[8.0, 4.0, 32.0, 52.0], [50.0, 10.0, 90.0, 20.0]]), torch.tensor([2, 0]), 0),
                   Target(torch.tensor([[0.0, 0.0, 96.0, 64.0], [5.0, 5.0, 5.0, 9.0]]), torch.tensor([1, 1]), 1)])
    got = _targets(batch, (64, 96), torch.device("cpu"))
    # by hand: cx = (x0 + x1) / 2 / 96, cy = (y0 + y1) / 2 / 64, w = (x1 - x0) / 96, h = (y1 - y0) / 64
    expected = torch.tensor([[20 / 96, 28 / 64, 24 / 96, 48 / 64],
                             [70 / 96, 15 / 64, 40 / 96, 10 / 64],
                             [48 / 96, 32 / 64, 96 / 96, 64 / 64]])  # the zero-width box is dropped
    torch.testing.assert_close(got["bboxes"], expected)
    torch.testing.assert_close(got["cls"], torch.tensor([[2.0], [0.0], [1.0]]))
    torch.testing.assert_close(got["batch_idx"], torch.tensor([0.0, 0.0, 1.0]))


def test_train_loss_on_a_non_square_batch_equals_criterion_with_hand_targets(adapter: UltralyticsAdapter) -> None:
    """forward_train on 64x96 images = ultralytics' own criterion fed hand-written targets."""
    from detdistill.adapters.ultralytics import _criterion

    torch.manual_seed(0)
    model = adapter.build(_cfg(), 3).train()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 96, generator=g) for _ in range(2)]
    batch = Batch(images, [Target(torch.tensor([[8.0, 4.0, 32.0, 52.0]]), torch.tensor([2]), 0),
                           Target(torch.tensor([[50.0, 10.0, 90.0, 30.0]]), torch.tensor([0]), 1)])
    losses, _ = adapter.forward_train(model, batch)
    hand = {"batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[2.0], [0.0]]),
            "bboxes": torch.tensor([[20 / 96, 28 / 64, 24 / 96, 48 / 64], [70 / 96, 20 / 64, 40 / 96, 20 / 64]])}
    with torch.no_grad():
        theirs, _ = _criterion(model)(model(torch.stack(images)), hand)
    ours = torch.stack([losses[k] for k in ("box", "cls", "dfl")]).detach()
    assert float(ours[0]) > 0  # boxes were assigned: the box term is not vacuous
    torch.testing.assert_close(ours * 2, theirs, rtol=1e-4, atol=1e-4)


def test_predict_inside_image_bounds(adapter: UltralyticsAdapter) -> None:
    torch.manual_seed(0)
    model = adapter.build(_cfg(score_thresh=1e-4, detections_per_img=50), 3).train()
    images = [torch.rand(3, 50, 70), torch.rand(3, 64, 40)]  # not multiples of 32: padded inside
    dets = adapter.predict(model, images)
    assert model.training  # mode restored
    assert len(dets) == 2
    for d, im in zip(dets, images):
        assert isinstance(d, Detections) and 0 < len(d.boxes) <= 50
        h, w = im.shape[-2:]
        assert d.boxes.dtype == torch.float32 and d.labels.dtype == torch.int64
        assert (d.boxes[:, 0] >= 0).all() and (d.boxes[:, 1] >= 0).all()
        assert (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
        assert (d.boxes[:, 2] > d.boxes[:, 0]).all() and (d.boxes[:, 3] > d.boxes[:, 1]).all()
        assert ((d.labels >= 0) & (d.labels < 3)).all() and ((d.scores >= 1e-4) & (d.scores <= 1)).all()


@pytest.mark.parametrize(("arch", "neck", "fpn", "chans"), [
    ("yolov8n", (15, 18, 21), {"p4": 12, "p5": 9}, (64, 128, 256)),
    ("yolo11n", (16, 19, 22), {"p4": 13, "p5": 10}, (64, 128, 256)),
])
def test_taps_channels_and_strides(adapter: UltralyticsAdapter, arch: str, neck: tuple[int, ...],
                                   fpn: dict[str, int], chans: tuple[int, ...]) -> None:
    model = adapter.build(_cfg(arch), 3)
    taps = adapter.taps(model)
    for lvl, idx, c, s in zip(("p3", "p4", "p5"), neck, chans, (8, 16, 32)):
        for group in ("neck", "pan"):
            info = taps[f"{group}.{lvl}"]
            assert (info.module, info.channels, info.stride, info.key) == (f"model.{idx}", c, s, None)
    for lvl, idx in fpn.items():
        info = taps[f"fpn.{lvl}"]
        assert info.module == f"model.{idx}"
        assert (info.channels, info.stride) == (taps[f"pan.{lvl}"].channels, taps[f"pan.{lvl}"].stride)
    # the stride-8 top-down output is the first Detect input itself: no separate fpn.p3
    assert "fpn.p3" not in taps
    assert taps["backbone.p3"].stride == 8


def test_forward_features_stops_before_the_head(adapter: UltralyticsAdapter) -> None:
    model = adapter.build(_cfg(), 3).eval()
    calls = {"head": 0, "neck": 0}
    h1 = model.model[-1].register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    h2 = model.model[21].register_forward_hook(lambda *a: calls.__setitem__("neck", calls["neck"] + 1))
    try:
        with torch.no_grad():
            raw = adapter.forward_features(model, [torch.rand(3, 64, 64), torch.rand(3, 60, 50)], need_head=False)
        assert calls == {"head": 0, "neck": 1} and raw.cls_logits is None
        with torch.no_grad():
            raw = adapter.forward_features(model, [torch.rand(3, 64, 64), torch.rand(3, 60, 50)], need_head=True)
        assert calls == {"head": 1, "neck": 2} and raw.cls_logits.shape == (2, 84, 3)
    finally:
        h1.remove()
        h2.remove()
    # the early-exit path computes the same neck maps as the full forward
    x = torch.rand(1, 3, 64, 64)
    seen = []
    h = model.model[18].register_forward_hook(lambda _m, _i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(x)
            adapter.forward_features(model, [x[0]], need_head=False)
    finally:
        h.remove()
    torch.testing.assert_close(seen[0], seen[1])


_RUNNER = """
import socket, sys
from importlib.abc import MetaPathFinder

class NoDetdistill(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "detdistill" or name.startswith("detdistill."):
            raise ImportError("detdistill must not be needed to load an export")

sys.meta_path.insert(0, NoDetdistill())
def refuse(*a, **k):
    raise OSError("network refused")
socket.getaddrinfo = socket.create_connection = refuse
socket.socket.connect = lambda self, *a: refuse()

import torch
from safetensors.torch import load_file, save_file
sys.path.insert(0, sys.argv[1])
import load_model

model = load_model.load(sys.argv[1])
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    decoded, raw = model(x)
boxes, scores, labels = load_model.detect(model, x[0], score_thresh=1e-4)
save_file({"decoded": decoded, "scores": raw["scores"].contiguous(), "boxes": raw["boxes"].contiguous()}, sys.argv[3])
print("OK", type(model).__name__, len(boxes), "detdistill" in sys.modules)
"""


def test_export_loads_without_detdistill(adapter: UltralyticsAdapter, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = adapter.build(_cfg(), 3)
    adapter.forward_train(model, _batch())  # moves BN running statistics away from their init
    out_dir = tmp_path / "export"
    weights = adapter.export(model, _cfg(), 3, out_dir)
    assert weights == out_dir / "model.safetensors" and (out_dir / "load_model.py").is_file()
    spec = json.loads((out_dir / "model.json").read_text())
    assert spec["arch"] == "yolov8n" and spec["num_classes"] == 3 and spec["yaml"]["nc"] == 3

    x = torch.rand(1, 3, 64, 96)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    (tmp_path / "runner.py").write_text(_RUNNER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "YOLO_OFFLINE")}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # same kernels as this process: bitwise-equal outputs
    res = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(out_dir), str(tmp_path / "x.safetensors"),
                          str(tmp_path / "y.safetensors")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK DetectionModel" in res.stdout and res.stdout.strip().endswith("False")
    theirs = load_file(str(tmp_path / "y.safetensors"))
    model.eval()
    with torch.no_grad():
        decoded, raw = model(x)
    assert torch.equal(theirs["decoded"], decoded)
    assert torch.equal(theirs["scores"], raw["scores"]) and torch.equal(theirs["boxes"], raw["boxes"])

    # and the export's weights rebuild the same model through the adapter (model.weights)
    again = adapter.build(_cfg(weights=str(weights)), 3).eval()
    with torch.no_grad():
        assert torch.equal(again(x)[0], decoded)


def test_ultralytics_checkpoint_weights(adapter: UltralyticsAdapter, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A local ultralytics ``.pt`` (pickled model, as its trainer writes it) loads; a wrong arch is refused."""
    import copy

    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    src = adapter.build(_cfg(), 3)
    plain = DetectionModel(cfg=copy.deepcopy(src.yaml), nc=3, verbose=False)
    plain.load_state_dict(src.state_dict())
    plain.args = get_cfg()
    tmp_path = tmp_path_factory.mktemp("ckpt")
    # ultralytics rewrites a path without any "u" ending in yolov5s.pt to yolov5su.pt and downloads it
    path = tmp_path / "yolov5s.pt"
    torch.save({"model": None, "ema": copy.deepcopy(plain).half(), "train_args": vars(get_cfg())}, path)
    model = adapter.build(_cfg(weights=str(path)), 3)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.half().to(v.dtype) if v.is_floating_point() else v), k
    with pytest.raises(ValueError, match="does not fit"):
        adapter.build(_cfg("yolov8s", weights=str(path)), 3)
    with pytest.raises(FileNotFoundError):
        adapter.build(_cfg(weights=str(tmp_path / "yolov8n.pt")), 3)  # a name is never downloaded


def test_distillation_steps_yolov8s_to_yolov8n(adapter: UltralyticsAdapter) -> None:
    from detdistill.distill.distiller import Distiller, Teacher

    torch.manual_seed(0)
    teacher = adapter.build(_cfg("yolov8s"), 3)
    student = adapter.build(_cfg(), 3).train()
    head_calls = []
    hook = teacher.model[-1].register_forward_hook(lambda *a: head_calls.append(1))
    pairs = [("neck.p3", "neck.p3"), ("neck.p4", "neck.p4"), ("neck.p5", "neck.p5")]
    distiller = Distiller(student, adapter, [DistillTermConfig(method="pkd", pairs=pairs)],
                          teacher=Teacher(teacher, adapter))
    connectors = distiller.method("pkd").connectors
    assert len(connectors) == 3  # 64/128/256 -> 128/256/512 channels
    opt = torch.optim.SGD(list(student.parameters()) + list(distiller.parameters()), lr=0.01)
    losses = distiller(student, _batch(), step=0)
    hook.remove()
    assert {"box", "cls", "dfl", "kd/pkd"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["kd/pkd"].detach()) > 0
    assert head_calls == []  # the teacher stopped after its neck
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in connectors.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()

    # logit KD: same head layout and input size -> same (N, A, C) logits; the term equals
    # kl_logit_loss on the two heads' class logits, taken independently of the Distiller
    from detdistill.losses.kl import kl_logit_loss

    kl = Distiller(student, adapter, [DistillTermConfig(method="kl", weight=2.0)], teacher=Teacher(teacher, adapter))
    losses = kl(student, _batch(), step=0)
    kl.remove_hooks()
    with torch.no_grad():
        _, s_raw = adapter.forward_train(student, _batch(), need_raw=True)
        t_raw = adapter.forward_features(teacher.eval(), _batch().images, need_head=True)
    assert s_raw.cls_logits.shape == t_raw.cls_logits.shape == (2, 84, 3)
    expected = 2.0 * kl_logit_loss(s_raw.cls_logits, t_raw.cls_logits)
    assert float(expected) > 0
    torch.testing.assert_close(losses["kd/kl"].detach(), expected, rtol=1e-5, atol=1e-7)
    distiller.remove_hooks()


def test_mssd_self_distillation_on_fpn_pan_pairs(adapter: UltralyticsAdapter) -> None:
    from detdistill.distill.distiller import Distiller
    from detdistill.taps import FeatureTaps
    from detdistill.losses.mssd import MSSDLoss

    torch.manual_seed(0)
    student = adapter.build(_cfg(), 3).train()
    batch = _batch()
    # through the Distiller: one scale (it wants one channel count for all MSSD pairs)
    term = DistillTermConfig(method="mssd", pairs=[("fpn.p4", "pan.p4")],
                             params={"scale_weights": [1.0], "size_thresholds": []})
    distiller = Distiller(student, adapter, [term])
    losses = distiller(student, batch, step=0)
    assert float(losses["kd/mssd/mssd_self"].detach()) > 0 and torch.isfinite(losses["kd/mssd/mssd_mask"])
    sum(losses.values()).backward()
    distiller.remove_hooks()

    # both PAN levels with their own FPN teacher, straight into the loss (per-scale channels)
    taps = adapter.taps(student)
    names = ["fpn.p4", "pan.p4", "fpn.p5", "pan.p5"]
    loss = MSSDLoss(channels=[taps["pan.p4"].channels, taps["pan.p5"].channels], num_scales=2,
                    scale_weights=(1.0, 1.0), size_thresholds=(96.0,), strides=(16, 32))
    with FeatureTaps(student, {n: taps[n] for n in names}) as rec:
        adapter.forward_train(student, batch)
        parts = loss([rec.get("fpn.p4"), rec.get("fpn.p5")], [rec.get("pan.p4"), rec.get("pan.p5")],
                     [t.boxes for t in batch.targets], (64, 64))
    assert float(parts["mssd_self"].detach()) > 0
    student.zero_grad()
    parts["mssd_self"].backward()
    assert student.model[21].cv2.conv.weight.grad is not None  # the PAN side learns


def test_predict_image_whole(adapter: UltralyticsAdapter) -> None:
    from detdistill.engine.evaluate import predict_image

    torch.manual_seed(0)
    model = adapter.build(_cfg(score_thresh=1e-3), 3)
    image = torch.rand(3, 96, 120)
    dets = predict_image(model, adapter, image, EvalConfig())
    assert isinstance(dets, Detections) and len(dets.boxes) > 0
    assert (dets.boxes[:, 0::2] <= 120).all() and (dets.boxes[:, 1::2] <= 96).all() and (dets.boxes >= 0).all()


def test_predict_image_tiled(adapter: UltralyticsAdapter) -> None:
    """Tiles of different sizes (edge tiles are smaller) go through predict and merge back."""
    from detdistill.engine.evaluate import predict_image

    torch.manual_seed(0)
    model = adapter.build(_cfg(score_thresh=1e-3), 3)
    image = torch.rand(3, 96, 120)
    dets = predict_image(model, adapter, image, EvalConfig(tile_size=64, tile_overlap=16), tile_batch=1)
    assert isinstance(dets, Detections) and len(dets.boxes) > 0
    assert (dets.boxes[:, 0::2] <= 120).all() and (dets.boxes[:, 1::2] <= 96).all() and (dets.boxes >= 0).all()

    # Independently: 64-px tiles every 48 px, the last flush with the edge (x 0/48/56, y 0/32);
    # each tile predicted alone, shifted by its origin, then class-wise NMS at 0.6.
    from torchvision.ops import batched_nms

    boxes, scores, labels = [], [], []
    for y0 in (0, 32):
        for x0 in (0, 48, 56):
            d = adapter.predict(model, [image[:, y0:y0 + 64, x0:x0 + 64]])[0]
            boxes.append(d.boxes + torch.tensor([x0, y0, x0, y0], dtype=torch.float32))
            scores.append(d.scores)
            labels.append(d.labels)
    b, s, lab = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = batched_nms(b, s, lab, 0.6)[:EvalConfig().max_dets]
    assert len(keep) < len(b)  # overlapping tiles produced duplicates that the merge removed
    torch.testing.assert_close(dets.boxes, b[keep], rtol=0, atol=0)
    torch.testing.assert_close(dets.scores, s[keep], rtol=0, atol=0)
    assert torch.equal(dets.labels, lab[keep])


def test_ultralytics_pt_without_a_restricted_loader_is_refused(adapter: UltralyticsAdapter, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An ultralytics whose torch_safe_load has no ``safe_only`` would unpickle the whole file:
    the adapter refuses instead of falling back, and says what to do."""
    import ultralytics.nn.tasks as tasks

    marker = tmp_path / "code_ran"
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"not even read")

    def old_loader(weight):  # the signature of an ultralytics without the restricted loader
        marker.touch()
        raise AssertionError("must not be called")

    monkeypatch.setattr(tasks, "torch_safe_load", old_loader)
    with pytest.raises(ValueError, match="no restricted loader.*convert the checkpoint to a state dict"):
        adapter.build(_cfg(weights=str(path)), 3)
    assert not marker.exists()
