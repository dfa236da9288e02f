"""ultralytics YOLO detectors (v8, 11, 12; also the anchor-free v3/v5/v6/v9) behind the adapter seam.

ultralytics quirks handled here and nowhere else:

- ``model(x)`` returns only raw predictions: in train mode the Detect head's dict
  ``{"boxes": (N, 4*reg_max, A), "scores": (N, C, A), "feats": [maps]}``, in eval mode
  ``(decoded (N, 4 + C, A), that dict)``. The loss is a separate object
  (:class:`ultralytics.utils.loss.v8DetectionLoss`) that reads its gains from ``model.args``,
  and NMS is a separate function.
- Targets are a flat dict: ``batch_idx``, ``cls`` and ``bboxes`` as xywh normalised by the
  (padded) input size.
- ``import ultralytics`` probes the network (a DNS lookup) unless ``YOLO_OFFLINE`` is set;
  this module sets it before the import. Models are built only from the YAML files shipped
  inside the package, never from names that ultralytics would resolve by downloading.
- ``import ultralytics`` patches ``PIL.Image.open`` (to pip-install a HEIF plugin on an
  unreadable image), ``torch.save`` and ``OMP_NUM_THREADS`` process-wide; this module puts
  them back (:func:`_undo_import_patches`).

Loss normalisation: :meth:`UltralyticsAdapter.forward_train` returns the gain-weighted
``box`` (CIoU, x7.5), ``cls`` (BCE, x0.5) and ``dfl`` (x1.5) terms *per batch*, i.e. the
vector ultralytics computes before it multiplies by the batch size. Their sum times the
batch size is exactly the loss ultralytics backpropagates; ours does not grow with the
batch, like every other detdistill loss and KD term.

Taps (derived from the model graph, not hard-coded): ``neck.pL`` = ``pan.pL`` are the Detect
head's inputs (v8: layers 15/18/21, 11: 16/19/22); ``fpn.pL`` is the top-down map that the
bottom-up PAN level ``L`` fuses (v8: ``fpn.p4`` = 12, ``fpn.p5`` = 9; 11: 13 and 10). The
finest level ends the top-down path and *is* the first Detect input, so it has no separate
FPN map and ``fpn.p3`` does not exist (see ``docs/ultralytics.md`` for MSSD).

Supported heads: the plain anchor-free ``Detect`` (one-to-many, NMS). End-to-end heads
(YOLOv10, YOLO26: ``one2one`` branch, NMS-free) and the World/YOLOE/RT-DETR heads are not.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import shutil
import tempfile
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Any

# Must precede the first ultralytics import: it skips ultralytics' import-time DNS probe.
os.environ.setdefault("YOLO_OFFLINE", "1")

import PIL.Image  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

_OMP_BEFORE = os.environ.get("OMP_NUM_THREADS")
import ultralytics  # noqa: E402


def _undo_import_patches() -> None:
    """Undo the process-wide side effects of ``import ultralytics`` that reach beyond it.

    ultralytics replaces ``PIL.Image.open`` with a wrapper that, on an unreadable image,
    tries to *pip-install* ``pi-heif`` (and then raises ``ModuleNotFoundError`` instead of
    ``PIL.UnidentifiedImageError``, which breaks detdistill's dataset validation); it wraps
    ``torch.save`` in a retry loop (unsafe for detdistill's atomic checkpoint writes to an
    open file); and it sets ``OMP_NUM_THREADS=1`` for every later subprocess. detdistill uses
    none of these, so the originals are put back (also when ultralytics was imported first).
    """
    try:
        from ultralytics.utils import patches
    except ImportError:  # pragma: no cover - layout of another ultralytics version
        return
    if getattr(PIL.Image.open, "__module__", None) == patches.__name__ and callable(getattr(patches, "_image_open", None)):
        PIL.Image.open = patches._image_open
    if getattr(torch.save, "__module__", None) == patches.__name__ and callable(getattr(patches, "_torch_save", None)):
        torch.save = patches._torch_save
    if _OMP_BEFORE is None and os.environ.get("OMP_NUM_THREADS") == "1":  # set by this import, not by the user
        os.environ.pop("OMP_NUM_THREADS", None)


from collections.abc import Mapping, Sequence  # noqa: E402

from torch import Tensor, nn  # noqa: E402
from ultralytics.nn.modules.head import Detect  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils.loss import v8DetectionLoss  # noqa: E402

try:  # ultralytics >= 8.3.x keeps NMS in utils/nms.py; older releases in utils/ops.py
    from ultralytics.utils.nms import non_max_suppression  # noqa: E402
except ImportError:  # pragma: no cover - depends on the installed version
    from ultralytics.utils.ops import non_max_suppression  # type: ignore[no-redef]  # noqa: E402

_undo_import_patches()

from ..config import ModelConfig  # noqa: E402
from ..models import ultralytics_loader  # noqa: E402
from ..modules import eval_mode, unwrap  # noqa: E402
from ..structures import Batch, Detections, RawOutputs  # noqa: E402
from ..taps import TapInfo, probe_tap_shapes  # noqa: E402
from .base import ADAPTERS, no_extra_inputs, no_options  # noqa: E402
from .export import onnx_export, write_export  # noqa: E402
from .weights import load_weights, read_state_dict  # noqa: E402

__all__ = ["UltralyticsAdapter"]

# The raw-dict Detect output and the (box, cls, dfl) loss vector this adapter relies on.
_MIN_VERSION = (8, 4)
try:
    _VERSION = tuple(int(p) for p in ultralytics.__version__.split(".")[:2])
except ValueError:  # pragma: no cover - an unusual version string; the runtime checks still apply
    _VERSION = _MIN_VERSION
if _VERSION < _MIN_VERSION:
    raise ImportError(f"the ultralytics adapter needs ultralytics>={'.'.join(map(str, _MIN_VERSION))}, "
                      f"found {ultralytics.__version__}")

_LOG = logging.getLogger(__name__)

PAD_VALUE = 114 / 255  # ultralytics' letterbox grey
_LOSS_TERMS = ("box", "cls", "dfl")
# Gains of ultralytics' cfg/default.yaml, used if its defaults cannot be read.
_FALLBACK_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


# ---- the catalogue of buildable architectures ---------------------------------------
def _models_dir() -> Path:
    return Path(ultralytics.__file__).resolve().parent / "cfg" / "models"


@lru_cache(maxsize=1)
def _catalogue() -> dict[str, tuple[Path, str | None]]:
    """``arch -> (family yaml, scale letter)`` for every shipped plain-``Detect`` model YAML.

    A family file with ``scales`` (``yolov8.yaml``, ``yolov8-p2.yaml``) yields one arch per
    scale letter, inserted after the version number (``yolov8n``, ``yolov8s-p2``), the
    naming ultralytics itself uses. Files without scales (``yolov9t.yaml``) keep their stem.
    """
    out: dict[str, tuple[Path, str | None]] = {}
    for path in sorted(_models_dir().glob("*/*.yaml")):
        try:
            spec = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):  # pragma: no cover - a broken install
            continue
        head = spec.get("head") if isinstance(spec, dict) else None
        if not head or not isinstance(head[-1], list) or head[-1][2] != "Detect" or spec.get("end2end"):
            continue
        scales = spec.get("scales")
        match = re.match(r"^(yolov?\d+)(.*)$", path.stem)
        if scales and match:
            for letter in scales:
                out[f"{match.group(1)}{letter}{match.group(2)}"] = (path, letter)
        elif not scales:
            out[path.stem] = (path, None)
    return out


def _model_yaml(arch: str, num_classes: int) -> dict[str, Any]:
    """The model dict DetectionModel is built from (family YAML + scale + ``nc``)."""
    cat = _catalogue()
    if arch not in cat:
        raise ValueError(f"model.arch {arch!r} is not an ultralytics detection model shipped with ultralytics "
                         f"{ultralytics.__version__}; choose one of {', '.join(sorted(cat))}")
    path, scale = cat[arch]
    spec = yaml.safe_load(path.read_text())
    if scale is not None:
        spec["scale"] = scale
    spec["yaml_file"] = f"{arch}.yaml"
    spec["nc"] = int(num_classes)
    return spec


def _default_hyp() -> Any:
    """ultralytics' default training hyperparameters (``cfg/default.yaml``), as ``model.args``."""
    try:
        from ultralytics.cfg import get_cfg

        return get_cfg()
    except Exception:  # pragma: no cover - layout of a future ultralytics
        from types import SimpleNamespace

        return SimpleNamespace(**_FALLBACK_GAINS)


def _ensure_hyp(model: nn.Module) -> None:
    """``v8DetectionLoss`` reads ``model.args.box/cls/dfl``; checkpoints may store a dict or nothing."""
    args = getattr(model, "args", None)
    if isinstance(args, dict):
        hyp = _default_hyp()
        for k in _LOSS_TERMS:
            if k in args:
                setattr(hyp, k, args[k])
        model.args = hyp
    elif args is None or not all(hasattr(args, k) for k in _LOSS_TERMS):
        model.args = _default_hyp()


def _detect(model: nn.Module) -> Detect:
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
    if type(head) is not Detect:  # subclasses (Segment, Pose, OBB, YOLOE, v10) have other contracts
        raise TypeError(f"not an ultralytics detection model with a plain Detect head: {type(model).__name__}")
    if getattr(head, "one2one_cv2", None) is not None:
        raise TypeError("end-to-end (one2one, NMS-free) Detect heads (YOLOv10/YOLO26) are not supported by this adapter")
    return head


def _max_stride(model: nn.Module) -> int:
    return int(max(int(s) for s in model.stride.tolist())) if hasattr(model, "stride") else 32


# ---- tensors in, tensors out ---------------------------------------------------------
def _stack(images: list[Tensor], stride: int) -> tuple[Tensor, tuple[int, int]]:
    """Pad every image bottom/right to a common size that is a multiple of ``stride``."""
    if not images:
        raise ValueError("no images")
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    h, w = math.ceil(h / stride) * stride, math.ceil(w / stride) * stride
    padded = [F.pad(im, (0, w - im.shape[-1], 0, h - im.shape[-2]), value=PAD_VALUE)
              if im.shape[-2:] != (h, w) else im for im in images]
    return torch.stack(padded), (h, w)


def _targets(batch: Batch, size: tuple[int, int], device: torch.device) -> dict[str, Tensor]:
    """ultralytics' batch dict; zero-area boxes are dropped (the assigner cannot use them)."""
    h, w = size
    idx, cls, boxes = [], [], []
    for i, t in enumerate(batch.targets):
        b = t.boxes.to(device=device, dtype=torch.float32).reshape(-1, 4)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        b, lab = b[keep], t.labels.to(device).reshape(-1)[keep]
        xywh = torch.stack(((b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                            (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h), dim=1)
        idx.append(torch.full((len(b),), float(i), device=device))
        cls.append(lab.float().view(-1, 1))
        boxes.append(xywh)
    return {"batch_idx": torch.cat(idx), "cls": torch.cat(cls), "bboxes": torch.cat(boxes)}


def _head_dict(out: Any) -> dict[str, Any]:
    """The Detect head's raw dict from whatever ``model(x)`` / ``Detect(x)`` returned."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        out = out[1]  # eval mode: (decoded, raw)
    if isinstance(out, dict) and "one2many" in out:
        out = out["one2many"]
    if not (isinstance(out, dict) and {"boxes", "scores", "feats"} <= set(out)):
        raise RuntimeError(f"ultralytics {ultralytics.__version__}: unexpected Detect output {type(out).__name__}; "
                           "this adapter needs the raw-dict head contract of ultralytics >= 8.4")
    return out


def _with_head(raw: RawOutputs, head: dict[str, Any], strides: list[int]) -> RawOutputs:
    """``raw`` plus the Detect outputs: ``(N, A, C)`` class logits, ``(N, A, 4 * reg_max)`` DFL box
    logits over all levels (finest first), and the maps the head consumed."""
    raw.cls_logits = head["scores"].permute(0, 2, 1)
    raw.box_preds = head["boxes"].permute(0, 2, 1)
    raw.box_format = "yolo_dfl"
    raw.features = list(head["feats"])
    raw.strides = strides
    return raw


def _geometry(x: Tensor, images: list[Tensor]) -> RawOutputs:
    return RawOutputs(input_size=(int(x.shape[-2]), int(x.shape[-1])),
                      image_sizes=[(int(im.shape[-2]), int(im.shape[-1])) for im in images])


# One loss object per (bare) model: the criterion holds the assigner and anchors' device.
_CRITERIA: "weakref.WeakKeyDictionary[nn.Module, v8DetectionLoss]" = weakref.WeakKeyDictionary()


def _criterion(model: nn.Module) -> v8DetectionLoss:
    device = next(model.parameters()).device
    crit = _CRITERIA.get(model)
    if crit is None or crit.device != device:
        _ensure_hyp(model)
        crit = v8DetectionLoss(model)
        _CRITERIA[model] = crit
    return crit


def _strides(model: nn.Module) -> list[int]:
    return [int(s) for s in model.stride.tolist()]


def _loss_terms(model: nn.Module, head: dict[str, Any], batch: Batch, size: tuple[int, int]) -> dict[str, Tensor]:
    """ultralytics' (box, cls, dfl) loss of a head dict, per batch (it returns them times the batch size)."""
    n = int(head["scores"].shape[0])
    total, _ = _criterion(model)(head, _targets(batch, size, head["scores"].device))
    terms = total.reshape(-1) / n
    if terms.numel() != len(_LOSS_TERMS):
        raise RuntimeError(f"ultralytics {ultralytics.__version__}: v8DetectionLoss returned {terms.numel()} terms, "
                           "expected (box, cls, dfl)")
    return dict(zip(_LOSS_TERMS, terms.unbind()))


def _run_layers(model: nn.Module, x: Tensor, stop: int) -> Tensor | Any:
    """ultralytics' layer loop (``f`` routing, ``save`` list), stopping after layer ``stop``."""
    y: list[Any] = []
    for m in model.model:
        if m.i > stop:
            break
        if m.f != -1:
            x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
        x = m(x)
        y.append(x if m.i in model.save else None)
    return x


def _load_ultralytics_pt(model: nn.Module, path: Path) -> None:
    """Copy the weights of an ultralytics ``.pt`` checkpoint (a pickled whole model) into ``model``.

    Read through ultralytics' own restricted loader (``torch_safe_load(safe_only=True)``):
    ``weights_only`` unpickling of an allow-list of ultralytics classes, which also disables
    ultralytics' auto-install of modules a checkpoint names. An ultralytics without that
    option is refused: there is no fall-back to a full unpickle. Backbone and neck must match exactly; the
    head's class convolutions are kept random when the number of classes differs.
    """
    import inspect

    from ultralytics.nn.tasks import torch_safe_load

    if "safe_only" not in inspect.signature(torch_safe_load).parameters:
        # Without it, ultralytics unpickles the whole file (arbitrary code): refuse rather than fall back.
        raise ValueError(f"cannot read ultralytics checkpoint {path} safely: the installed ultralytics "
                         f"{ultralytics.__version__} has no restricted loader (torch_safe_load(safe_only=...)); "
                         "upgrade ultralytics, or convert the checkpoint to a state dict (e.g. safetensors) and load that")
    kwargs = {"safe_only": True}
    try:
        # ultralytics rewrites names like ``yolov5s.pt`` to ``yolov5su.pt`` and downloads what is
        # missing: hand it the file under a neutral name in a private folder instead.
        with tempfile.TemporaryDirectory(prefix="detdistill-ckpt-") as tmp:
            neutral = Path(tmp) / "checkpoint.pt"
            try:
                neutral.symlink_to(path)
            except OSError:
                shutil.copyfile(path, neutral)
            ckpt, _ = torch_safe_load(str(neutral), **kwargs)
    except (TypeError, ModuleNotFoundError) as err:
        raise ValueError(f"cannot read ultralytics checkpoint {path}: {err}. Convert it to a state dict "
                         "(e.g. `safetensors`) with a plain ultralytics install and load that instead") from err
    src = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(src, nn.Module):
        raise ValueError(f"{path} is not an ultralytics checkpoint (no model inside)")
    theirs = {k: v.float() if v.is_floating_point() else v for k, v in src.state_dict().items()}
    own = model.state_dict()
    head = f"model.{len(model.model) - 1}."
    fits = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    body_bad = sorted(k for k in own if not k.startswith(head) and k not in fits)
    if body_bad:
        raise ValueError(f"ultralytics checkpoint {path} does not fit the configured model.arch: "
                         f"{len(body_bad)} backbone/neck tensors missing or mis-shaped, e.g. {', '.join(body_bad[:5])}")
    skipped = sorted(k for k in own if k.startswith(head) and k not in fits)
    if skipped:
        _LOG.warning("%s: %d head tensors differ (class count?) and stay randomly initialised: %s",
                     path, len(skipped), ", ".join(skipped[:4]))
    model.load_state_dict(fits, strict=False)


class UltralyticsAdapter:
    """ultralytics ``DetectionModel`` (YOLOv8, YOLO11, ...) built from the package's model YAMLs.

    ``ModelConfig.arch`` names the model (``yolov8n``, ``yolo11s``, ``yolov8n-p2``): the scale
    letter picks depth, width and channel cap from the family YAML's ``scales``.
    ``backbone``, ``fpn_channels``, ``head_convs``, ``norm`` and ``anchor_sizes`` do not apply
    to these models and are ignored.
    """

    name = "ultralytics"

    def archs(self) -> list[str]:
        return sorted(_catalogue())

    def build(self, cfg: ModelConfig, num_classes: int) -> nn.Module:
        """A randomly initialised ``DetectionModel``, or one loaded from ``cfg.weights``.

        ``cfg.weights`` is a local file: a ``.safetensors``/state-dict file or a detdistill
        checkpoint (read without unpickling objects), or an ultralytics ``.pt`` checkpoint,
        which is a pickled whole model and is unpickled through ultralytics' loader, so use
        only trusted files. Nothing is ever downloaded.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        no_options(self.name, cfg)
        model = DetectionModel(cfg=_model_yaml(cfg.arch, num_classes), nc=num_classes, verbose=False)
        _detect(model)
        model.args = _default_hyp()  # the loss gains; ultralytics' trainer would attach its args here
        model.names = {i: str(i) for i in range(num_classes)}
        model.detdistill_postprocess = {"score_thresh": cfg.score_thresh, "nms_thresh": cfg.nms_thresh,
                                        "max_det": cfg.detections_per_img}
        if cfg.weights:
            path = Path(cfg.weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"weights file not found: {path} (weights load from local files only; "
                                        "ultralytics model names are not downloaded)")
            try:
                read_state_dict(path)
                is_state_dict = True
            except ValueError:
                if path.suffix != ".pt":
                    raise
                is_state_dict = False
            if is_state_dict:
                load_weights(model, path)
            else:
                _load_ultralytics_pt(model, path.resolve())
        return model

    # ---- taps -------------------------------------------------------------------
    def taps(self, model: nn.Module) -> dict[str, TapInfo]:
        """``neck.pL`` / ``pan.pL``: the Detect inputs; ``fpn.pL``: top-down maps; ``backbone.pL``.

        ``L = log2(stride)``. For each PAN (bottom-up) level, the FPN map is the lateral input
        of the Concat that feeds it (v8: ``fpn.p4 = model.12``, ``fpn.p5 = model.9``). The finest
        level has no separate FPN map, because the top-down path ends in the first Detect input
        (v8: ``model.15`` is both), so ``fpn.p3`` is not offered: an MSSD pair on it would compare
        a map with itself. ``backbone.pL`` is the last backbone layer at each neck stride.
        """
        bare = unwrap(model)
        detect = _detect(bare)
        shapes = _probe(self, bare)  # layer index -> (channels, stride)
        names: list[tuple[str, int]] = []
        level: dict[int, str] = {}
        for i in detect.f:
            c, s = shapes.get(i, (0, 0))
            if s <= 0 or s & (s - 1):
                continue
            level[i] = f"p{int(math.log2(s))}"
        for i in detect.f:
            if i in level:
                names += [(f"neck.{level[i]}", i), (f"pan.{level[i]}", i)]
        for i in detect.f:
            lateral = _fpn_lateral(bare, i, shapes)
            if i in level and lateral is not None:
                names.append((f"fpn.{level[i]}", lateral))
        n_backbone = len(bare.yaml.get("backbone", [])) if isinstance(getattr(bare, "yaml", None), dict) else 0
        for i in detect.f:
            if i not in level:
                continue
            stride = shapes[i][1]
            same = [j for j in range(n_backbone) if shapes.get(j, (0, 0))[1] == stride]
            if same:
                names.append((f"backbone.{level[i]}", max(same)))
        out: dict[str, TapInfo] = {}
        for tap, idx in names:
            c, s = shapes.get(idx, (0, 0))
            out[tap] = TapInfo(tap, f"model.{idx}", None, c, s)
        return out

    # ---- forward passes ---------------------------------------------------------
    def forward_train(self, model: nn.Module, batch: Batch, *, need_raw: bool = False,
                      extra_inputs: Mapping[str, Any] | None = None) -> tuple[dict[str, Tensor], RawOutputs]:
        """``{"box", "cls", "dfl"}``: ultralytics' gain-weighted terms, per batch (not times the batch size)."""
        no_extra_inputs(self.name, extra_inputs)
        bare = unwrap(model)
        _detect(bare)
        x, size = _stack(batch.images, _max_stride(bare))
        head = _head_dict(model(x))  # through DDP, so gradients synchronise
        losses = _loss_terms(bare, head, batch, size)
        raw = _geometry(x, batch.images)
        return losses, _with_head(raw, head, _strides(bare)) if need_raw else raw

    def forward_features(self, model: nn.Module, images: list[Tensor], *, need_head: bool) -> RawOutputs:
        """Runs the layers up to the last Detect input (the neck) only, or the whole model with ``need_head``.

        Taps on modules inside the Detect layer record only with ``need_head``.
        """
        bare = unwrap(model)
        detect = _detect(bare)
        x, _ = _stack(images, _max_stride(bare))
        stop = detect.i if need_head else max(detect.f)
        out = _run_layers(bare, x, stop)
        if not need_head:
            return _geometry(x, images)
        return _with_head(_geometry(x, images), _head_dict(out), _strides(bare))

    def backbone_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters of the layers the model YAML lists under ``backbone``."""
        bare = unwrap(model)
        n = len(bare.yaml.get("backbone", [])) if isinstance(getattr(bare, "yaml", None), dict) else 0
        return [p for m in bare.model[:n] for p in m.parameters()]

    def head(self, model: nn.Module, features: list[Tensor], raw: RawOutputs, batch: Batch | None = None) -> RawOutputs:
        """The Detect head on ``features`` (one map per Detect input, finest first)."""
        bare = unwrap(model)
        detect = _detect(bare)
        if raw.input_size is None or raw.image_sizes is None:
            raise ValueError("head() needs the geometry of the input: pass the RawOutputs of forward_train/forward_features")
        if len(features) != detect.nl:
            raise ValueError(f"the Detect head takes {detect.nl} maps, got {len(features)}")
        out = _head_dict(detect(list(features)))  # a copy: Detect may rebind its list's entries
        return _with_head(RawOutputs(input_size=raw.input_size, image_sizes=raw.image_sizes), out, _strides(bare))

    def head_loss(self, model: nn.Module, raw: RawOutputs, batch: Batch) -> dict[str, Tensor]:
        """ultralytics' own loss of :meth:`head` outputs: the terms ``forward_train`` returns."""
        if raw.cls_logits is None or raw.box_preds is None or raw.features is None or raw.input_size is None:
            raise ValueError("head_loss needs the outputs of head() (cls_logits, box_preds, features, input_size)")
        head = {"boxes": raw.box_preds.permute(0, 2, 1), "scores": raw.cls_logits.permute(0, 2, 1), "feats": raw.features}
        return _loss_terms(unwrap(model), head, batch, raw.input_size)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[Tensor]) -> list[Detections]:
        """NMS-ed detections per image, in that image's pixels (padding removed by clipping).

        Multi-label NMS (a box may be kept for several classes), as ultralytics' validator
        uses for mAP; thresholds and ``max_det`` come from the ``ModelConfig`` given to ``build``.
        """
        if not images:
            return []
        bare = unwrap(model)
        detect = _detect(bare)
        post = getattr(bare, "detdistill_postprocess", {"score_thresh": 0.05, "nms_thresh": 0.6, "max_det": 100})
        with eval_mode(bare):
            x, (h, w) = _stack(images, _max_stride(bare))
            out = bare(x)
        decoded = out[0] if isinstance(out, (tuple, list)) else out  # (N, 4 + C, A), xywh pixels
        results = []
        for i, im in enumerate(images):
            # one image per call: ultralytics' NMS has a wall-clock budget per call and would
            # silently drop the later images of a batch on a slow machine
            det = non_max_suppression(decoded[i:i + 1].float(), conf_thres=post["score_thresh"], iou_thres=post["nms_thresh"],
                                      multi_label=True, max_det=post["max_det"], nc=detect.nc,
                                      max_wh=max(7680, 4 * max(h, w)))[0]
            ih, iw = int(im.shape[-2]), int(im.shape[-1])
            boxes = det[:, :4].clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, iw)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ih)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # drops boxes lying in the padding
            results.append(Detections(boxes[keep].float(), det[keep, 4].float(), det[keep, 5].long()))
        return results

    # ---- export -----------------------------------------------------------------
    def export_onnx(self, model: nn.Module, out_path: Path, *, opset: int = 17) -> Path:
        """ONNX in ultralytics' own export mode (Detect returns its decoded predictions; anchors
        recomputed for any size): input ``images`` ``(N, 3, H, W)`` float RGB in [0, 1], H and W
        multiples of the largest stride (pad as ``predict`` does); output ``output``
        ``(N, 4 + C, A)``: box centre x, y, width, height in pixels, then C class scores, for
        each of A anchor points. NMS is left to the caller, as in ultralytics' ONNX models."""
        bare = copy.deepcopy(unwrap(model)).cpu().eval()
        detect = _detect(bare)
        detect.export, detect.format, detect.dynamic = True, "onnx", True
        s = _max_stride(bare)
        return onnx_export(bare, torch.rand(1, 3, 2 * s, 3 * s), out_path, input_names=["images"],
                           output_names=["output"],
                           dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                         "output": {0: "batch", 2: "anchors"}}, opset=opset)

    def export(self, model: nn.Module, cfg: ModelConfig, num_classes: int, out_dir: Path, *,
               class_names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None) -> Path:
        """``model.safetensors`` + ``model.json`` (the full model YAML) + ``load_model.py`` (ultralytics only)."""
        bare = unwrap(model)
        _detect(bare)
        spec = {"framework": "ultralytics", "arch": cfg.arch, "num_classes": num_classes,
                "ultralytics_version": ultralytics.__version__, "yaml": copy.deepcopy(bare.yaml),
                "score_thresh": cfg.score_thresh, "nms_thresh": cfg.nms_thresh, "detections_per_img": cfg.detections_per_img,
                "input": "RGB float in [0, 1], native resolution, padded bottom/right to a multiple of "
                         f"{_max_stride(bare)} with {PAD_VALUE:.4f}"}
        return write_export(bare, out_dir, spec, ultralytics_loader, class_names=class_names, category_ids=category_ids)


ADAPTERS.add("ultralytics", UltralyticsAdapter())


def _fpn_lateral(model: nn.Module, idx: int, shapes: dict[int, tuple[int, int]]) -> int | None:
    """The top-down (FPN) map that the bottom-up (PAN) layer ``idx`` fuses, or ``None``.

    Walk back along ``f == -1`` from ``idx`` to the Concat that feeds it. If that Concat's
    own ``-1`` input was *downsampled* from a finer map, ``idx`` is a PAN level and the
    Concat's other input is the FPN map at the same stride. If it was upsampled, ``idx``
    ends the top-down path itself and has no separate FPN map.
    """
    layers = model.model
    stride = shapes.get(idx, (0, 0))[1]
    j = idx
    for _ in range(8):
        m = layers[j]
        if type(m).__name__ == "Concat":
            f = list(m.f) if isinstance(m.f, (list, tuple)) else [m.f]
            if len(f) != 2 or -1 not in f:
                return None
            lateral = f[1] if f[0] == -1 else f[0]
            lateral = lateral if lateral >= 0 else j + lateral
            prev = j - 1  # the -1 input
            before = layers[prev].f if layers[prev].f != -1 else prev - 1
            if not isinstance(before, int) or before < 0:
                return None
            finer = shapes.get(before, (0, 0))[1]
            if 0 < finer < shapes.get(prev, (0, 0))[1] and shapes.get(lateral, (0, 0))[1] == stride:
                return lateral
            return None
        if m.f != -1 or j == 0:
            return None
        j -= 1
    return None


def _probe(adapter: UltralyticsAdapter, model: nn.Module) -> dict[int, tuple[int, int]]:
    """(channels, stride) of every map-producing layer up to the neck, from one dry forward on a blank image."""
    shapes = probe_tap_shapes(adapter, model, {str(m.i): (f"model.{m.i}", None) for m in model.model},
                              size=max(64, 2 * _max_stride(model)))
    return {int(i): (c, s) for i, (c, s, kind) in shapes.items() if kind == "map"}
