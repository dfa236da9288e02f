"""Hugging Face ``transformers`` DETRs (DETR, Conditional DETR, Deformable DETR, RT-DETR, RT-DETRv2).

Needs the ``[detr]`` extra (``transformers>=5``); the rest of detdistill imports without it.
transformers quirks handled here and nowhere else:

- Targets are ``{"class_labels", "boxes"}`` dicts with *normalised cxcywh* boxes. DETR,
  Conditional and Deformable DETR read a ``pixel_mask`` and their boxes are normalised to each
  image's own size (as the original code does); RT-DETR ignores the mask, and its boxes are
  normalised to the padded input. :func:`_frame` gives each image's normalising size.
- The model's own loss (Hungarian matching, auxiliary and, for RT-DETR, denoising terms) is the
  task loss; it is logged as one term, ``detr_loss``, the weighted total transformers computes.
- RT-DETR prefixes its denoising queries in training: every per-query output is cut at
  ``denoising_meta_values["dn_num_split"]`` so KD methods see the matching queries only.
- Per-decoder-layer logits and boxes come from ``auxiliary_outputs`` plus the last layer
  (DETR, Conditional, Deformable; auxiliary losses are always on, see
  :mod:`detdistill.models.hf_detr`), or from ``intermediate_logits`` /
  ``intermediate_reference_points`` (RT-DETR). The first three return ``auxiliary_outputs``
  only when given labels, so a teacher's forward passes empty ones.
- Predictions go through the architecture's own image processor's
  ``post_process_object_detection``; export is ``save_pretrained`` of the model and of that
  processor, so the student loads and runs with transformers alone.
- Deformable DETR ignores ``decoder_attention_mask``: an extra query group must run as its own
  decoder pass, never as masked extra queries (see the ``detr_query_prior`` method).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from ..config import ModelConfig
from ..models import hf_detr
from ..modules import eval_mode, unwrap
from ..structures import Batch, Detections, QueryGroup, RawOutputs
from ..taps import TapInfo, probe_tap_shapes
from .base import ADAPTERS
from .weights import load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ModelConfig keys of the CNN detectors that mean nothing here: setting one is an error.
_CNN_ONLY = ("fpn_channels", "head_convs", "norm", "anchor_sizes", "reg_bias_init")


def _arch_of(model: nn.Module) -> str:
    model = unwrap(model)
    for arch in hf_detr.archs():
        if type(model) is hf_detr.model_class(arch):
            return arch
    raise TypeError(f"not a transformers DETR built by detdistill: {type(model).__name__}")


def _check(cfg: ModelConfig) -> None:
    # a non-default value (a checkpoint's saved config lists every key, so "was it set" is not enough)
    set_here = sorted(k for k in _CNN_ONLY if getattr(cfg, k) != type(cfg).model_fields[k].default)
    if set_here:
        raise ValueError(f"model.{set_here[0]} does not apply to transformers DETRs; their width and depth are "
                         f"set in model.options (d_model, encoder_layers, decoder_layers, num_queries, ...)")
    hf_detr.family(cfg.arch)


def _strides(model: nn.Module) -> list[int]:
    """Input pixels per cell of each map the transformer reads (the input projections)."""
    cfg = unwrap(model).config
    fam = hf_detr.family(_arch_of(model))
    strides = [2 ** (int(s.removeprefix("stage")) + 1) for s in fam.stages]
    extra = getattr(cfg, "num_feature_levels", len(strides)) - len(strides)
    for _ in range(max(extra, 0)):  # Deformable DETR's extra levels: stride-2 convs on the last stage
        strides.append(strides[-1] * 2)
    return strides


def _proj_modules(model: nn.Module) -> list[str]:
    """Module paths of the per-level input projections (the maps the encoder reads)."""
    bare = unwrap(model)
    if hasattr(bare.model, "encoder_input_proj"):
        return [f"model.encoder_input_proj.{i}" for i in range(len(bare.model.encoder_input_proj))]
    if hasattr(bare.model, "input_proj"):
        return [f"model.input_proj.{i}" for i in range(len(bare.model.input_proj))]
    return ["model.input_projection"]


def _frame(model: nn.Module, batch_images: list[Tensor], input_size: tuple[int, int]) -> list[tuple[int, int]]:
    """``(H, W)`` each image's boxes are normalised by."""
    if hf_detr.family(_arch_of(model)).masks_padding:
        return [(int(im.shape[-2]), int(im.shape[-1])) for im in batch_images]
    return [input_size] * len(batch_images)


class TransformersAdapter:
    """transformers' DETR family, built from config classes (random init or a local folder)."""

    name = "transformers"

    def archs(self) -> list[str]:
        return hf_detr.archs()

    def build(self, cfg: ModelConfig, num_classes: int) -> nn.Module:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        _check(cfg)
        cls = hf_detr.model_class(cfg.arch)
        if cfg.weights and Path(cfg.weights).is_dir():
            folder = Path(cfg.weights)
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"model.weights {folder}: a folder must be a transformers `save_pretrained` "
                                        "folder (config.json + model.safetensors)")
            model = cls.from_pretrained(str(folder), local_files_only=True)
            if model.config.num_labels != num_classes:
                raise ValueError(f"model.weights {folder}: the model has {model.config.num_labels} classes, the data "
                                 f"{num_classes}")
        else:
            model = cls(hf_detr.build_config(cfg.arch, cfg.backbone, num_classes, cfg.options))
            if cfg.weights:
                load_weights(model, cfg.weights)
        # what predict() applies (transformers' post-processing takes them per call)
        model.detdistill_postprocess = {"score_thresh": cfg.score_thresh, "max_det": cfg.detections_per_img}
        if cfg.arch == "deformable_detr":
            _expose_encoder_levels(model)
        return model

    # ---- inputs -----------------------------------------------------------------
    def _inputs(self, model: nn.Module, images: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Pixels padded bottom-right to a common size, a multiple of 32 (normalised as the
        family's processor does), and the pixel mask (1 = image, 0 = padding).

        RT-DETR's hybrid encoder concatenates upsampled stride-32 maps with stride-16 ones, which
        only fit on inputs divisible by 32; the masked families are unaffected by the extra padding.
        """
        h = -(-max(int(im.shape[-2]) for im in images) // 32) * 32
        w = -(-max(int(im.shape[-1]) for im in images) // 32) * 32
        pixels = images[0].new_zeros((len(images), 3, h, w))
        mask = torch.zeros((len(images), h, w), dtype=torch.long, device=images[0].device)
        normalize = hf_detr.family(_arch_of(model)).normalize
        mean = torch.tensor(IMAGENET_MEAN, device=images[0].device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images[0].device).view(3, 1, 1)
        for i, im in enumerate(images):
            ih, iw = im.shape[-2:]
            pixels[i, :, :ih, :iw] = (im - mean) / std if normalize else im
            mask[i, :ih, :iw] = 1
        return pixels, mask

    def _labels(self, model: nn.Module, batch: Batch, input_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        out = []
        for (fh, fw), t in zip(_frame(model, batch.images, input_size), batch.targets):
            cxcywh = box_convert(t.boxes, "xyxy", "cxcywh") / t.boxes.new_tensor([fw, fh, fw, fh])
            out.append({"class_labels": t.labels, "boxes": cxcywh.clamp(0, 1)})
        return out

    # ---- taps -------------------------------------------------------------------
    def taps(self, model: nn.Module) -> dict[str, TapInfo]:
        """``backbone.stage1..4`` (ResNet stages), ``neck.pK`` (the input projections the encoder
        reads, named by stride 2^K like the CNNs' FPN levels), ``encoder.pK`` (the encoder's
        output maps per level: RT-DETR's as its decoder projects them, Deformable DETR's
        sequence cut back into levels), ``encoder.tokens`` (the non-RT-DETR encoders' output,
        ``(N, L, D)``) and ``decoder.layerI`` (each decoder layer's
        query states, ``(N, Q, D)``; in RT-DETR training these include its denoising queries)."""
        bare = unwrap(model)
        names: list[tuple[str, str, str | int | None]] = []
        for k in range(len(bare.model.backbone.model.encoder.stages)):
            names.append((f"backbone.stage{k + 1}", f"model.backbone.model.encoder.stages.{k}", None))
        for module, stride in zip(_proj_modules(bare), _strides(bare)):
            names.append((f"neck.p{stride.bit_length() - 1}", module, None))
        if hasattr(bare.model, "decoder_input_proj"):
            for i, stride in enumerate(_strides(bare)):
                names.append((f"encoder.p{stride.bit_length() - 1}", f"model.decoder_input_proj.{i}", None))
        else:
            names.append(("encoder.tokens", "model.encoder", 0))
        if hasattr(bare.model.encoder, "detdistill_levels"):
            for i, stride in enumerate(_strides(bare)):
                names.append((f"encoder.p{stride.bit_length() - 1}", f"model.encoder.detdistill_levels.{i}", None))
        for i in range(len(bare.model.decoder.layers)):
            names.append((f"decoder.layer{i}", f"model.decoder.layers.{i}", None))
        shapes = probe_tap_shapes(self, bare, {tap: (module, key) for tap, module, key in names})
        return {tap: TapInfo(tap, module, key, *shapes[tap]) for tap, module, key in names if tap in shapes}

    # ---- forward passes ---------------------------------------------------------
    def forward_train(self, model: nn.Module, batch: Batch, *, need_raw: bool = False,
                      extra_inputs: Mapping[str, Any] | None = None) -> tuple[dict[str, Tensor], RawOutputs]:
        """The model's own loss; with ``extra_inputs={"query_group": QueryGroup}`` the group also
        runs through the decoder, in a second pass over this forward's encoder output (so it never
        attends to, or changes, the model's own queries), and its per-layer outputs are returned
        in ``group_layer_logits`` / ``group_layer_boxes``. The task loss does not include it."""
        bare = unwrap(model)
        group = _query_group(bare, extra_inputs)
        pixels, mask = self._inputs(bare, batch.images)
        input_size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        with _DecoderInputs(bare, enabled=group is not None) as captured:
            out = model(pixel_values=pixels, pixel_mask=mask, labels=self._labels(bare, batch, input_size))
        raw = self._raw(bare, out, batch.images, input_size, need_head=need_raw)
        if group is not None:
            raw.group_layer_logits, raw.group_layer_boxes = _group_pass(bare, captured.kwargs, group)
        return {"detr_loss": out.loss}, raw

    def forward_features(self, model: nn.Module, images: list[Tensor], *, need_head: bool) -> RawOutputs:
        bare = unwrap(model)
        pixels, mask = self._inputs(bare, images)
        # DETR, Conditional and Deformable DETR return their per-layer (auxiliary) outputs only
        # when given labels: empty ones cost one trivial matching and change no output.
        labels = None
        if need_head:
            labels = [{"class_labels": torch.zeros(0, dtype=torch.long, device=pixels.device),
                       "boxes": pixels.new_zeros((0, 4))} for _ in images]
        with _DecoderInputs(bare, enabled=need_head and _arch_of(bare) in GROUP_ARCHS) as captured:
            out = bare(pixel_values=pixels, pixel_mask=mask, labels=labels)
        raw = self._raw(bare, out, images, (int(pixels.shape[-2]), int(pixels.shape[-1])), need_head=need_head)
        if captured.kwargs:
            kw = captured.kwargs
            raw.decoder_queries = QueryGroup(_arch_of(bare), kw["inputs_embeds"], kw["reference_points"],
                                             kw.get("object_queries_position_embeddings"))
        return raw

    def _raw(self, model: nn.Module, out: Any, images: list[Tensor], input_size: tuple[int, int], *,
             need_head: bool) -> RawOutputs:
        raw = RawOutputs(input_size=input_size, image_sizes=[(int(i.shape[-2]), int(i.shape[-1])) for i in images])
        if not need_head:
            return raw
        dn = 0
        meta = getattr(out, "denoising_meta_values", None)
        if meta is not None:
            dn = int(meta["dn_num_split"][0])
        if getattr(out, "intermediate_logits", None) is not None:  # RT-DETR: (N, L, Q', C) and (N, L, Q', 4)
            logits = list(out.intermediate_logits[:, :, dn:].unbind(1))
            boxes = list(out.intermediate_reference_points[:, :, dn:].unbind(1))
        else:
            aux = out.auxiliary_outputs or []
            logits = [a["logits"] for a in aux] + [out.logits]
            boxes = [a["pred_boxes"] for a in aux] + [out.pred_boxes]
        raw.layer_logits = logits
        raw.layer_boxes = boxes
        raw.cls_logits = logits[-1]
        raw.box_preds = boxes[-1]
        raw.box_format = "cxcywh_norm"
        raw.queries = out.last_hidden_state[:, dn:]
        raw.box_frame = _frame(model, images, input_size)
        raw.class_activation = hf_detr.family(_arch_of(model)).classes
        return raw

    def backbone_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The ResNet's parameters (not the input projections, encoder or decoder)."""
        return list(unwrap(model).model.backbone.parameters())

    def head(self, model: nn.Module, features: list[Tensor], raw: RawOutputs, batch: Batch | None = None) -> RawOutputs:
        raise NotImplementedError(
            "a DETR's 'head' is its whole encoder-decoder: running it on replacement features (ScaleKD's assistant) "
            "is not supported for transformers DETRs; use a feature method (pkd, ssim, l2) or detr_* methods")

    def head_loss(self, model: nn.Module, raw: RawOutputs, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError("head_loss is not supported for transformers DETRs (see head())")

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[Tensor]) -> list[Detections]:
        """transformers' own post-processing (``post_process_object_detection``) of the outputs."""
        bare = unwrap(model)
        with eval_mode(bare):
            pixels, mask = self._inputs(bare, images)
            out = bare(pixel_values=pixels, pixel_mask=mask)
        arch = _arch_of(bare)
        frame = _frame(bare, images, (int(pixels.shape[-2]), int(pixels.shape[-1])))
        settings = getattr(bare, "detdistill_postprocess", {"score_thresh": 0.05, "max_det": 100})
        threshold, top_k = settings["score_thresh"], settings["max_det"]
        post = _post_process(arch, out, threshold, frame, top_k)
        dets = []
        for r, (h, w) in zip(post, ((int(i.shape[-2]), int(i.shape[-1])) for i in images)):
            boxes = r["boxes"].float()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            keep = r["scores"].argsort(descending=True)[:top_k]
            dets.append(Detections(boxes[keep], r["scores"][keep].float(), r["labels"][keep].long()))
        return dets

    # ---- export -----------------------------------------------------------------
    def export_onnx(self, model: nn.Module, out_path: Path, *, opset: int = 17) -> Path:
        raise NotImplementedError("ONNX export of transformers DETRs is not supported by detdistill; export with "
                                  "`detdistill export` (save_pretrained) and use transformers' or optimum's exporters")

    def export(self, model: nn.Module, cfg: ModelConfig, num_classes: int, out_dir: Path, *,
               class_names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None) -> Path:
        """``save_pretrained`` of the model (``config.json`` with the class names as ``id2label``,
        ``model.safetensors``) and of its image processor, plus detdistill's ``model.json``."""
        bare = unwrap(model)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        bare.config.id2label = dict(enumerate(names))
        bare.config.label2id = {n: i for i, n in enumerate(names)}
        bare.save_pretrained(str(out_dir))
        hf_detr.image_processor(cfg.arch).save_pretrained(str(out_dir))
        meta: dict[str, Any] = {"framework": "transformers", "arch": cfg.arch, "backbone": cfg.backbone,
                                "num_classes": num_classes, "class_names": names,
                                "box_frame": "image" if hf_detr.family(cfg.arch).masks_padding else "padded input",
                                "score_thresh": cfg.score_thresh, "detections_per_img": cfg.detections_per_img,
                                "load": f"transformers.{hf_detr.family(cfg.arch).model}.from_pretrained(folder)"}
        if category_ids is not None:
            meta["category_ids"] = list(category_ids)
        (out_dir / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
        return out_dir / "model.safetensors"


class _LevelMap(nn.Module):
    """Identity: the point where one level of the encoder's output passes as an ``(N, D, H, W)``
    map, so that it can be tapped like any module (it holds no weights)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def _expose_encoder_levels(model: nn.Module) -> None:
    """Give Deformable DETR's encoder per-level output maps (taps ``encoder.pK``).

    Its encoder returns one flattened ``(N, sum_l H_l W_l, D)`` sequence; the level shapes are
    in its ``spatial_shapes_list`` argument. The encoder's class is swapped for a subclass whose
    forward also passes each level, reshaped, through a :class:`_LevelMap` (only while one is
    hooked). A subclass, not a patched instance method, so copies (the EMA) stay correct; the
    state dict and ``save_pretrained`` are unchanged.
    """
    encoder = model.model.encoder
    base = type(encoder)

    class EncoderWithLevelMaps(base):  # type: ignore[misc, valid-type]
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            shapes = kwargs.get("spatial_shapes_list")
            if shapes is not None and any(level._forward_hooks for level in self.detdistill_levels):
                tokens = out[0]
                start = 0
                for level, (h, w) in zip(self.detdistill_levels, shapes):
                    h, w = int(h), int(w)
                    level(tokens[:, start:start + h * w].transpose(1, 2).reshape(tokens.shape[0], -1, h, w))
                    start += h * w
            return out

    EncoderWithLevelMaps.__qualname__ = EncoderWithLevelMaps.__name__ = base.__name__
    encoder.__class__ = EncoderWithLevelMaps
    encoder.detdistill_levels = nn.ModuleList(_LevelMap() for _ in range(model.config.num_feature_levels))


#: Architectures whose decoder can run an extra query group (queries + reference points in, per-layer
#: boxes out). DETR and Conditional DETR decode from learned positional queries without reference
#: points: DETRDistill's query priors are not implemented for them.
GROUP_ARCHS = ("deformable_detr", "rt_detr", "rt_detr_v2")


class _DecoderInputs:
    """Records the keyword arguments of the model's decoder call (a removable pre-hook)."""

    def __init__(self, model: nn.Module, *, enabled: bool) -> None:
        self.kwargs: dict[str, Any] = {}
        self._handle = None
        if enabled:
            self._handle = model.model.decoder.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        self.kwargs = dict(kwargs)

    def __enter__(self) -> "_DecoderInputs":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()


def _query_group(model: nn.Module, extra_inputs: Mapping[str, Any] | None) -> QueryGroup | None:
    if not extra_inputs:
        return None
    unknown = sorted(set(extra_inputs) - {"query_group"})
    if unknown:
        raise ValueError(f"the transformers adapter takes extra training input 'query_group' only; got {unknown}")
    group = extra_inputs["query_group"]
    arch = _arch_of(model)
    if arch not in GROUP_ARCHS:
        raise ValueError(f"{arch} cannot run an extra query group (no reference-point decoder); "
                         f"query groups work with {', '.join(GROUP_ARCHS)}")
    if not isinstance(group, QueryGroup) or group.kind != arch:
        raise ValueError(f"query_group must be a QueryGroup of a {arch} decoder, got "
                         f"{getattr(group, 'kind', type(group).__name__)!r}")
    return group


def _group_pass(model: nn.Module, captured: dict[str, Any], group: QueryGroup) -> tuple[list[Tensor], list[Tensor]]:
    """Run ``group`` through the decoder on the encoder output of the pass that ``captured``
    recorded; returns per-layer logits ``(N, Q, C)`` and cxcywh boxes ``(N, Q, 4)``, last last."""
    if not captured:
        raise RuntimeError("the decoder's inputs were not recorded: the forward pass did not reach the decoder")
    kw = dict(captured)
    kw["inputs_embeds"] = group.embeds
    kw["reference_points"] = group.reference_points
    if "object_queries_position_embeddings" in kw:
        kw["object_queries_position_embeddings"] = group.position
    if group.kind.startswith("rt_detr"):
        # RT-DETR passes its denoising self-attention mask (sized for dn + Q queries) under this
        # name; the group has no denoising queries
        kw["encoder_attention_mask"] = None
    out = model.model.decoder(**kw)
    if group.kind.startswith("rt_detr"):  # its decoder applies the heads itself
        return list(out.intermediate_logits.unbind(1)), list(out.intermediate_reference_points.unbind(1))
    # Deformable DETR: the heads live on the detection model; box = sigmoid(delta + logit(reference))
    hidden, refs = out.intermediate_hidden_states, out.intermediate_reference_points
    logits, boxes = [], []
    for level in range(hidden.shape[1]):
        reference = group.reference_points if level == 0 else refs[:, level - 1]
        reference = torch.logit(reference.clamp(1e-5, 1 - 1e-5))
        delta = model.bbox_embed[level](hidden[:, level])
        if reference.shape[-1] == 4:
            coord = delta + reference
        else:
            coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
        logits.append(model.class_embed[level](hidden[:, level]))
        boxes.append(coord.sigmoid())
    return logits, boxes


def _post_process(arch: str, out: Any, threshold: float, frame: list[tuple[int, int]], top_k: int) -> list[dict[str, Tensor]]:
    processor = hf_detr.image_processor(arch)
    kwargs: dict[str, Any] = {"threshold": threshold, "target_sizes": frame}
    if arch in ("deformable_detr", "conditional_detr"):
        kwargs["top_k"] = top_k
    return processor.post_process_object_detection(out, **kwargs)


ADAPTERS.add("transformers", TransformersAdapter())
