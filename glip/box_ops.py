"""Box math: IoU, conversions, the official box coder and clipping.

Two box conventions meet here (DESIGN.md "Boxes"):

* **continuous** ``xyxy`` (everything outside ``glip/``): ``x1 > x0``, a box covering pixel columns 10..19
  is ``[10, y0, 20, y1]``, width ``x1 - x0``;
* **legacy** ``xyxy`` (the official GLIP / maskrcnn_benchmark "+1" convention): ``x2``/``y2`` are the last
  covered pixel column/row, the same box is ``[10, y0, 19, y1 - 1]`` and widths are ``x2 - x1 + 1``.

``to_legacy`` / ``from_legacy`` convert between them. Anchors, the box coder, clipping, post-processing IoU
and NMS work in legacy coordinates because the official checkpoints and golden numbers were produced that way.
All functions take float tensors ``[N, 4]`` and return the same dtype and device.
"""

from __future__ import annotations

import math

import torch
import torchvision.ops
from torch import Tensor

# Largest log-scale a decoded width/height may grow by: exp(4.135) = 1000/16, as in the official coder.
DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes: Tensor) -> Tensor:
    """Areas of continuous ``xyxy`` boxes ``[N, 4]`` -> ``[N]`` (``(x1 - x0) * (y1 - y0)``)."""
    return torchvision.ops.box_area(boxes)


def box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Pairwise IoU of continuous ``xyxy`` boxes ``[N, 4]`` and ``[M, 4]`` -> ``[N, M]``.

    Empty inputs give an empty ``[N, M]`` matrix.
    """
    return torchvision.ops.box_iou(boxes_a, boxes_b)


def generalized_box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Pairwise generalized IoU of continuous ``xyxy`` boxes ``[N, 4]``, ``[M, 4]`` -> ``[N, M]`` in [-1, 1].

    Boxes must satisfy ``x1 >= x0`` and ``y1 >= y0`` (torchvision's contract). Empty inputs give ``[N, M]``.
    """
    return torchvision.ops.generalized_box_iou(boxes_a, boxes_b)


def box_iou_legacy(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Pairwise IoU of legacy ``xyxy`` boxes ``[N, 4]``, ``[M, 4]`` -> ``[N, M]`` with the "+1" convention.

    Area is ``(x2 - x1 + 1) * (y2 - y1 + 1)``, intersection width ``max(min(x2) - max(x1) + 1, 0)``, exactly
    the formula of the official ``ml_nms`` kernel and of ATSS assignment (computed literally rather than via
    ``from_legacy`` so that float32 rounding matches the official code).
    """
    area_a = (boxes_a[:, 2] - boxes_a[:, 0] + 1) * (boxes_a[:, 3] - boxes_a[:, 1] + 1)  # [N]
    area_b = (boxes_b[:, 2] - boxes_b[:, 0] + 1) * (boxes_b[:, 3] - boxes_b[:, 1] + 1)  # [M]
    top_left = torch.max(boxes_a[:, None, :2], boxes_b[None, :, :2])  # [N, M, 2]
    bottom_right = torch.min(boxes_a[:, None, 2:], boxes_b[None, :, 2:])  # [N, M, 2]
    size = (bottom_right - top_left + 1).clamp(min=0)  # [N, M, 2]
    intersection = size[..., 0] * size[..., 1]
    return intersection / (area_a[:, None] + area_b[None, :] - intersection)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Continuous ``[x, y, w, h]`` ``[N, 4]`` -> continuous ``xyxy`` ``[N, 4]`` (``x1 = x + w``)."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """Continuous ``xyxy`` ``[N, 4]`` -> continuous ``[x, y, w, h]`` ``[N, 4]`` (``w = x1 - x0``)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)


def to_legacy(boxes: Tensor) -> Tensor:
    """Continuous ``xyxy`` ``[N, 4]`` -> legacy "+1" ``xyxy`` ``[N, 4]``: ``x2 = x1 - 1``, ``y2 = y1 - 1``.

    A COCO ``[x, y, w, h]`` box becomes ``[x, y, x + w - 1, y + h - 1]`` this way, as in the official
    datasets.
    """
    return boxes - boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


def from_legacy(boxes: Tensor) -> Tensor:
    """Legacy "+1" ``xyxy`` ``[N, 4]`` -> continuous ``xyxy`` ``[N, 4]``: ``x1 = x2 + 1``, ``y1 = y2 + 1``."""
    return boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


def clip_boxes_legacy(boxes: Tensor, height: int, width: int) -> Tensor:
    """Clamp legacy ``xyxy`` boxes ``[N, 4]`` to an image: x in ``[0, width - 1]``, y in ``[0, height - 1]``.

    Returns a new tensor; boxes that collapse are kept (the official ``clip_to_image(remove_empty=False)``).
    """
    x = boxes[:, 0::2].clamp(min=0, max=width - 1)  # [N, 2]: x1, x2
    y = boxes[:, 1::2].clamp(min=0, max=height - 1)  # [N, 2]: y1, y2
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def valid_box_mask(boxes: Tensor) -> Tensor:
    """Bool ``[N]``: True for continuous ``xyxy`` boxes that are finite with ``x1 > x0`` and ``y1 > y0``."""
    finite = torch.isfinite(boxes).all(dim=-1)
    return finite & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def remove_degenerate(boxes: Tensor) -> Tensor:
    """Continuous ``xyxy`` ``[N, 4]`` -> ``[K, 4]``, only the boxes that pass ``valid_box_mask``."""
    return boxes[valid_box_mask(boxes)]


def batched_nms_legacy(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Class-aware NMS of legacy boxes with the "+1" IoU: the official ``ml_nms`` semantics.

    Boxes are visited by score, descending; a box is suppressed when its legacy IoU with a kept box of the
    same label is ``> iou_threshold``.

    Args:
        boxes: ``[N, 4]`` legacy ``xyxy``.
        scores: ``[N]``.
        labels: ``[N]`` integer class ids; boxes of different labels never suppress each other.
        iou_threshold: IoU above which a box is suppressed.

    Returns:
        int64 ``[K]`` indices of the kept boxes, sorted ascending (as the official kernel returns them).
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    # A legacy box [x1, x2] covers [x1, x2 + 1) continuously, so torchvision's IoU on from_legacy boxes is the
    # "+1" IoU. float64 keeps x2 + 1 exact; translating to a non-negative origin keeps torchvision's
    # per-label coordinate offsets from making boxes of different labels overlap.
    continuous = from_legacy(boxes.to(torch.float64))
    continuous = continuous - continuous.min()
    keep = torchvision.ops.batched_nms(continuous, scores.to(torch.float64), labels, iou_threshold)
    return keep.sort().values


class BoxCoder:
    """The official ATSS/GLIP box coder on legacy ``xyxy`` boxes.

    ``encode(gt, anchor)``: widths ``w = x2 - x1 + 1``, centres ``(x1 + x2) / 2``;
    ``d = (wx (gcx - acx) / aw, wy (gcy - acy) / ah, ww log(gw / aw), wh log(gh / ah))``.
    ``decode(d, anchor)``: ``cx = d0 / wx * aw + acx``, ``w = exp(min(d2 / ww, clip)) * aw``,
    box ``[cx - (w - 1) / 2, cy - (h - 1) / 2, cx + (w - 1) / 2, cy + (h - 1) / 2]``.

    Args:
        weights: ``(wx, wy, ww, wh)`` scaling of the deltas.
        bbox_xform_clip: upper clamp of ``d2 / ww`` and ``d3 / wh`` in decode, so ``exp`` cannot overflow.
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP,
    ) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """Regression targets ``[N, 4]`` of legacy gt boxes ``[N, 4]`` against matched anchors ``[N, 4]``."""
        wx, wy, ww, wh = self.weights
        anchor_w, anchor_h, anchor_cx, anchor_cy = _legacy_sizes_and_centres(anchors)
        gt_w, gt_h, gt_cx, gt_cy = _legacy_sizes_and_centres(gt_boxes)
        dx = wx * (gt_cx - anchor_cx) / anchor_w
        dy = wy * (gt_cy - anchor_cy) / anchor_h
        dw = ww * torch.log(gt_w / anchor_w)
        dh = wh * torch.log(gt_h / anchor_h)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Legacy boxes ``[N, 4]`` (dtype of ``deltas``) from deltas ``[N, 4]`` applied to legacy anchors."""
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        anchor_w, anchor_h, anchor_cx, anchor_cy = _legacy_sizes_and_centres(anchors)
        dw = (deltas[..., 2] / ww).clamp(max=self.bbox_xform_clip)
        dh = (deltas[..., 3] / wh).clamp(max=self.bbox_xform_clip)
        center_x = deltas[..., 0] / wx * anchor_w + anchor_cx
        center_y = deltas[..., 1] / wy * anchor_h + anchor_cy
        half_w = 0.5 * (torch.exp(dw) * anchor_w - 1)
        half_h = 0.5 * (torch.exp(dh) * anchor_h - 1)
        return torch.stack(
            (center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h), dim=-1
        )


def _legacy_sizes_and_centres(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Widths, heights (``x2 - x1 + 1``), centres (``(x1 + x2) / 2``), each ``[N]``, of legacy ``[N, 4]``."""
    widths = boxes[..., 2] - boxes[..., 0] + 1
    heights = boxes[..., 3] - boxes[..., 1] + 1
    center_x = (boxes[..., 2] + boxes[..., 0]) / 2
    center_y = (boxes[..., 3] + boxes[..., 1]) / 2
    return widths, heights, center_x, center_y
