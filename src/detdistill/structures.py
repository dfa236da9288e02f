"""Framework-neutral data types that cross the adapter seam.

Everything outside ``adapters/`` speaks these types: pixels, xyxy boxes and
contiguous class indices ``0..C-1``. Each adapter converts to and from its
framework's own contract (torchvision target dicts, DETR's normalised cxcywh,
ultralytics' batch dict).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor


@dataclass
class Target:
    """Ground truth for one (possibly cropped) image.

    Attributes:
        boxes: ``(K, 4)`` float32, xyxy in pixels of the image tensor it belongs to.
        labels: ``(K,)`` int64, contiguous class indices ``0..C-1``.
        image_id: the dataset-wide image id (the COCO id for COCO data).
        path: the source image file.
    """

    boxes: Tensor
    labels: Tensor
    image_id: int
    path: Path | None = None

    def to(self, device: torch.device | str) -> "Target":
        return Target(self.boxes.to(device), self.labels.to(device), self.image_id, self.path)


@dataclass
class Batch:
    """A collated batch: images may differ in size (adapters pad as their framework needs).

    Attributes:
        images: ``B`` float tensors ``(3, H_i, W_i)`` in ``[0, 1]``, RGB, not normalised.
        targets: ``B`` :class:`Target` objects, boxes in each image's pixel frame.
    """

    images: list[Tensor]
    targets: list[Target]

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch([im.to(device, non_blocking=True) for im in self.images], [t.to(device) for t in self.targets])


@dataclass
class Detections:
    """Predictions for one image, in the pixel frame of the image given to ``predict``.

    Attributes:
        boxes: ``(D, 4)`` float32 xyxy pixels.
        scores: ``(D,)`` float32 confidences in ``[0, 1]``.
        labels: ``(D,)`` int64 contiguous class indices.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    @staticmethod
    def empty() -> "Detections":
        return Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))

    def to(self, device: torch.device | str) -> "Detections":
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device))


#: The label of a crowd (ignore) region that covers every class, e.g. VisDrone's ignored
#: regions: detections of any class inside it are neither true nor false positives.
ANY_CLASS = -1

BoxFormat = Literal["fcos_ltrb", "retinanet_deltas", "yolo_dfl", "cxcywh_norm"]


@dataclass
class TwoStageOutputs:
    """A two-stage detector's (Faster R-CNN) head outputs in training, for its own loss.

    The region head runs on proposals sampled against the ground truth, so the sampling
    result travels with the logits (``roi_labels`` / ``roi_regression_targets``).

    Attributes:
        rpn_objectness: ``(N, A)`` RPN objectness logits over all anchors of all levels.
        rpn_deltas: ``(N, A, 4)`` RPN box deltas.
        anchors: ``N`` tensors ``(A, 4)`` xyxy px.
        proposals: ``N`` tensors ``(P_i, 4)`` xyxy px, the sampled regions.
        roi_logits: ``(sum P_i, C + 1)`` class logits, index 0 = background.
        roi_deltas: ``(sum P_i, 4 * (C + 1))`` class-specific box deltas.
        roi_labels: ``N`` tensors ``(P_i,)`` sampled targets (0 = background), or ``None``.
        roi_regression_targets: ``N`` tensors ``(P_i, 4)``, or ``None``.
    """

    rpn_objectness: Tensor
    rpn_deltas: Tensor
    anchors: list[Tensor] | None = None
    proposals: list[Tensor] | None = None
    roi_logits: Tensor | None = None
    roi_deltas: Tensor | None = None
    roi_labels: list[Tensor] | None = None
    roi_regression_targets: list[Tensor] | None = None


@dataclass
class QueryGroup:
    """What a DETR decoder starts from: one group of queries (DETRDistill's query priors).

    Attributes:
        kind: the architecture whose decoder these inputs fit (``"deformable_detr"``, ``"rt_detr"``):
            reference points are in that decoder's own parametrisation.
        embeds: ``(N, Q, D)`` content queries.
        reference_points: ``(N, Q, 2 or 4)``: normalised points (Deformable DETR) or box logits (RT-DETR).
        position: ``(N, Q, D)`` positional queries where the decoder takes them (Deformable DETR).
    """

    kind: str
    embeds: Tensor
    reference_points: Tensor
    position: Tensor | None = None


@dataclass
class RawOutputs:
    """Raw (before post-processing) outputs of one forward pass, framework-neutral.

    Every field is optional: an adapter fills what its model has, and a KD method reads
    what it declared it needs. ``A`` counts anchors/points over all levels, finest level
    first; ``Q`` counts queries.

    Attributes:
        cls_logits: dense class logits ``(N, A, C)`` (FCOS, RetinaNet, YOLO).
        box_preds: dense box predictions ``(N, A, K)`` in ``box_format``.
        box_format: ``"fcos_ltrb"`` (K = 4, ltrb distances / stride), ``"retinanet_deltas"``
            (K = 4, dx dy dw dh against the anchor), ``"yolo_dfl"`` (K = 4 * reg_max,
            distribution logits of ltrb) or ``"cxcywh_norm"`` (K = 4, DETR boxes).
        box_quality: ``(N, A, 1)`` localisation-quality logits (FCOS centerness).
        features: the maps the head consumed, ``(N, C, H_l, W_l)`` per level.
        strides: input pixels per cell of each level in ``features``.
        layer_logits: per decoder layer, last layer last, ``(N, Q, C)`` (DETR family).
        layer_boxes: per decoder layer, ``(N, Q, 4)`` cxcywh normalised to the image.
        queries: decoder output embeddings of the last layer, ``(N, Q, D)``.
        box_frame: DETRs: the ``(H, W)`` each image's ``cxcywh_norm`` boxes are normalised by
            (its own size, or the padded input's for models that read no pixel mask).
        class_activation: DETRs: ``"sigmoid"`` (``C`` logits) or ``"softmax"`` (``C + 1``, the last
            one "no object").
        decoder_queries: DETRs with query groups: the inputs this pass's decoder started from.
        group_layer_logits, group_layer_boxes: per decoder layer, the outputs of an extra query
            group run by ``forward_train(extra_inputs={"query_group": ...})`` in its own decoder pass.
        input_size: ``(H, W)`` of the padded network input.
        image_sizes: ``(H, W)`` of each image inside the padded input.
        two_stage: region-head outputs of two-stage detectors.
    """

    cls_logits: Tensor | None = None
    box_preds: Tensor | None = None
    box_format: BoxFormat | None = None
    box_quality: Tensor | None = None
    features: list[Tensor] | None = None
    strides: list[int] | None = None
    layer_logits: list[Tensor] | None = None
    layer_boxes: list[Tensor] | None = None
    queries: Tensor | None = None
    box_frame: list[tuple[int, int]] | None = None
    class_activation: Literal["sigmoid", "softmax"] | None = None
    decoder_queries: QueryGroup | None = None
    group_layer_logits: list[Tensor] | None = None
    group_layer_boxes: list[Tensor] | None = None
    input_size: tuple[int, int] | None = None
    image_sizes: list[tuple[int, int]] | None = None
    two_stage: TwoStageOutputs | None = None
