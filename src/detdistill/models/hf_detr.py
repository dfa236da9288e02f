"""Hugging Face ``transformers`` DETRs built from their config classes, with no hub look-up.

One :class:`DetrFamily` per architecture says which config, model and image-processor classes
build it and how it differs from the others (which backbone stages it reads, whether it
masks padding, how it classifies). :func:`build_config` turns a detdistill model spec into the
transformers config:

- the backbone is transformers' own ``ResNetConfig`` (depth 18, 34 or 50), passed as a config
  object: a backbone *name* string would make transformers query the hub, and timm is never used;
- every other transformers setting can be given in ``model.options`` under its transformers
  name (``num_queries``, ``decoder_layers``, ``d_model``, ...); unknown names are errors that
  list the valid ones;
- auxiliary (per-decoder-layer) losses are always on: DETRs train with them, and DETRDistill
  distils per layer. (DETR and Conditional DETR also change what their decoder returns with
  it, so the outputs have one layout in every run.)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import transformers
from transformers import PretrainedConfig, PreTrainedModel, ResNetConfig

#: ResNet depths -> (blocks per stage, layer type, stage widths), as torchvision's ResNets.
RESNETS: dict[str, tuple[list[int], str, list[int]]] = {
    "resnet18": ([2, 2, 2, 2], "basic", [64, 128, 256, 512]),
    "resnet34": ([3, 4, 6, 3], "basic", [64, 128, 256, 512]),
    "resnet50": ([3, 4, 6, 3], "bottleneck", [256, 512, 1024, 2048]),
}

#: Config keys detdistill sets itself; ``model.options`` may not set them.
RESERVED_OPTIONS = ("backbone_config", "backbone", "use_timm_backbone", "use_pretrained_backbone", "backbone_kwargs",
                    "num_labels", "id2label", "label2id", "auxiliary_loss", "encoder_in_channels", "num_channels")


@dataclass(frozen=True)
class DetrFamily:
    """How one transformers DETR architecture is built and read.

    Attributes:
        config, model, processor: transformers class names (looked up on the installed version).
        stages: ResNet stages whose maps feed the transformer (``stage4`` = stride 32).
        masks_padding: the model reads ``pixel_mask`` (DETR, Conditional, Deformable); its boxes
            are then normalised to each image's own size, as in the original code. RT-DETR reads
            no mask: its boxes are normalised to the padded input.
        classes: ``"sigmoid"`` (focal / varifocal, ``C`` logits) or ``"softmax"`` (``C + 1``
            logits, the last one "no object": DETR).
        normalize: the image processor normalises with ImageNet mean/std (RT-DETR's does not).
        denoising: training prefixes denoising queries (RT-DETR), split off by ``dn_num_split``.
    """

    config: str
    model: str
    processor: str
    stages: tuple[str, ...]
    masks_padding: bool
    classes: Literal["sigmoid", "softmax"]
    normalize: bool
    denoising: bool = False

    def classes_available(self) -> bool:
        return all(hasattr(transformers, n) for n in (self.config, self.model, self.processor))


FAMILIES: dict[str, DetrFamily] = {
    "detr": DetrFamily("DetrConfig", "DetrForObjectDetection", "DetrImageProcessor", ("stage4",), True, "softmax", True),
    "conditional_detr": DetrFamily("ConditionalDetrConfig", "ConditionalDetrForObjectDetection",
                                   "ConditionalDetrImageProcessor", ("stage4",), True, "sigmoid", True),
    "deformable_detr": DetrFamily("DeformableDetrConfig", "DeformableDetrForObjectDetection",
                                  "DeformableDetrImageProcessor", ("stage2", "stage3", "stage4"), True, "sigmoid", True),
    "rt_detr": DetrFamily("RTDetrConfig", "RTDetrForObjectDetection", "RTDetrImageProcessor",
                          ("stage2", "stage3", "stage4"), False, "sigmoid", False, denoising=True),
    "rt_detr_v2": DetrFamily("RTDetrV2Config", "RTDetrV2ForObjectDetection", "RTDetrImageProcessor",
                             ("stage2", "stage3", "stage4"), False, "sigmoid", False, denoising=True),
}


def archs() -> list[str]:
    """The architectures the installed transformers can build."""
    return [a for a, f in FAMILIES.items() if f.classes_available()]


def family(arch: str) -> DetrFamily:
    if arch not in FAMILIES or not FAMILIES[arch].classes_available():
        raise ValueError(f"model.arch {arch!r} is not a transformers DETR this transformers {transformers.__version__} "
                         f"can build; choose one of {', '.join(archs())}")
    return FAMILIES[arch]


def option_names(arch: str) -> list[str]:
    """The ``model.options`` keys ``arch`` accepts: its config class's settings, less the reserved ones."""
    cls = getattr(transformers, family(arch).config)
    params = inspect.signature(cls.__init__).parameters
    return sorted(p for p, v in params.items() if p not in RESERVED_OPTIONS and p != "self"
                  and v.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL))


def backbone_config(arch: str, backbone: str) -> ResNetConfig:
    if backbone not in RESNETS:
        raise ValueError(f"model.backbone {backbone!r}: the transformers DETRs use transformers' own ResNet; "
                         f"choose one of {', '.join(RESNETS)}")
    depths, layer_type, widths = RESNETS[backbone]
    return ResNetConfig(depths=depths, layer_type=layer_type, hidden_sizes=widths, embedding_size=64,
                        out_features=list(family(arch).stages))


def stage_channels(backbone: str, stages: tuple[str, ...]) -> list[int]:
    widths = RESNETS[backbone][2]
    return [widths[int(s.removeprefix("stage")) - 1] for s in stages]


def build_config(arch: str, backbone: str, num_classes: int, options: Mapping[str, Any]) -> PretrainedConfig:
    """The transformers config of ``arch`` with a ``backbone`` ResNet, ``num_classes`` classes and ``options``."""
    fam = family(arch)
    allowed = option_names(arch)
    reserved = sorted(set(options) & set(RESERVED_OPTIONS))
    if reserved:
        raise ValueError(f"model.options {reserved}: detdistill sets these itself (the backbone from model.backbone, "
                         "the classes from the data, auxiliary losses always on)")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"model.options {unknown} are not settings of transformers' {fam.config}; valid: {', '.join(allowed)}")
    kwargs: dict[str, Any] = dict(options)
    kwargs.update(backbone_config=backbone_config(arch, backbone), num_labels=num_classes, auxiliary_loss=True)
    if "use_pretrained_backbone" in inspect.signature(getattr(transformers, fam.config).__init__).parameters:
        kwargs["use_pretrained_backbone"] = False
    if arch.startswith("rt_detr"):
        width = kwargs.get("encoder_hidden_dim", kwargs.get("d_model", 256))
        kwargs.setdefault("encoder_hidden_dim", width)
        kwargs.setdefault("d_model", width)
        kwargs["encoder_in_channels"] = stage_channels(backbone, fam.stages)
        kwargs.setdefault("decoder_in_channels", [width] * len(fam.stages))
        kwargs.setdefault("freeze_backbone_batch_norms", False)  # trained from scratch: BN statistics must move
        kwargs.setdefault("anchor_image_size", None)  # anchors follow each input's size
    if arch == "deformable_detr":
        kwargs.setdefault("disable_custom_kernels", True)  # the pure-PyTorch attention: no kernel build, CPU works
    return getattr(transformers, fam.config)(**kwargs)


def model_class(arch: str) -> type[PreTrainedModel]:
    return getattr(transformers, family(arch).model)


def image_processor(arch: str, **overrides: Any) -> Any:
    """The architecture's own image processor, set to detdistill's input contract: no resizing
    (the data pipeline owns the scale), RGB in [0, 1] (no rescale), the family's normalisation."""
    fam = family(arch)
    kwargs: dict[str, Any] = {"do_resize": False, "do_rescale": False, "do_normalize": fam.normalize, "do_pad": True}
    kwargs.update(overrides)
    return getattr(transformers, fam.processor)(**kwargs)
