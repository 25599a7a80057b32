"""ATSS anchor assignment exactly as the official GLIP loss (``ATSSLossComputation.prepare_targets``).

Adaptive Training Sample Selection (Zhang et al., CVPR 2020): for every ground-truth box, the ``top_k``
anchors of each pyramid level whose centres are nearest to the box centre are candidates; the IoU threshold
of the box is the mean plus the (unbiased) standard deviation of its candidates' IoUs; a candidate is
positive when its IoU reaches the threshold and its centre lies strictly inside the box; an anchor positive
for several boxes keeps the one with the highest IoU.

All boxes here use the official legacy "+1" convention (``x2``/``y2`` are the last covered pixel, widths are
``x2 - x1 + 1``); ``glip.box_ops.to_legacy`` converts our continuous boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glip.box_ops import box_iou_legacy, from_legacy, valid_box_mask

# The official code requires the anchor centre to be this far inside every side of the box.
CENTRE_INSIDE_MARGIN = 0.01
# Boxes may stick out of the image by up to this many pixels (rounding of annotations), no more.
IMAGE_BORDER_TOLERANCE = 1.0


@dataclass(frozen=True)
class AtssAssignment:
    """The result of ATSS for one image with ``A`` anchors, ``G`` boxes and ``K`` candidates per box.

    Attributes:
        matched_gt_index: [A] int64, index of the assigned box per anchor, -1 = unassigned.
        candidate_indices: [K, G] int64, global anchor index (levels concatenated) of every candidate,
            level by level in increasing centre distance; ``K = sum_l min(top_k, A_l)``.
        candidate_ious: [K, G] float, legacy IoU of each candidate with its box.
        iou_mean, iou_std, iou_thresholds: [G] float, statistics of the candidate IoUs (std unbiased);
            threshold = mean + std.
        is_inside: [K, G] bool, candidate centre strictly inside the box (all sides > 0.01 px).
        is_positive: [K, G] bool, IoU >= threshold and inside (before resolving anchors claimed twice).
    """

    matched_gt_index: Tensor
    candidate_indices: Tensor
    candidate_ious: Tensor
    iou_mean: Tensor
    iou_std: Tensor
    iou_thresholds: Tensor
    is_inside: Tensor
    is_positive: Tensor


def check_boxes(boxes: Tensor, image_size_hw: tuple[int, int] | None = None, image_index: int = 0) -> None:
    """Raise a readable ``ValueError`` naming the image and the box if any box is unusable as a target.

    Args:
        boxes: [G, 4] float, CONTINUOUS xyxy pixels of the model input (x1 > x0, y1 > y0).
        image_size_hw: (H, W) of the unpadded image; boxes may exceed it by at most one pixel. None skips
            that check.
        image_index: position of the image in its batch, only used in the message.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"image {image_index}: boxes must have shape [G, 4], got {tuple(boxes.shape)}")
    usable = valid_box_mask(boxes) & _within_image(boxes, image_size_hw)
    if bool(usable.all()):
        return
    box_index = int((~usable).nonzero()[0, 0])
    box = boxes[box_index].detach().to("cpu", torch.float64).tolist()
    shown = "[" + ", ".join(f"{value:g}" for value in box) + "]"
    raise ValueError(
        f"image {image_index}: box {box_index} {shown} (continuous xyxy) is invalid: "
        f"{_box_problem(box, image_size_hw)}"
    )


def _within_image(boxes: Tensor, image_size_hw: tuple[int, int] | None) -> Tensor:
    """[G] bool: continuous xyxy boxes [G, 4] stick out of the (H, W) image by at most the tolerance."""
    if image_size_hw is None:
        return torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    height, width = image_size_hw
    low = -IMAGE_BORDER_TOLERANCE
    return (
        (boxes[:, 0] >= low)
        & (boxes[:, 1] >= low)
        & (boxes[:, 2] <= width + IMAGE_BORDER_TOLERANCE)
        & (boxes[:, 3] <= height + IMAGE_BORDER_TOLERANCE)
    )


def _box_problem(box: list[float], image_size_hw: tuple[int, int] | None) -> str:
    """Say in words why a box rejected by ``check_boxes`` (continuous xyxy) is unusable."""
    x0, y0, x1, y1 = box
    if not all(math.isfinite(value) for value in box):
        return "a coordinate is NaN or infinite"
    if x1 <= x0:
        return "x1 <= x0 (empty width)"
    if y1 <= y0:
        return "y1 <= y0 (empty height)"
    height, width = image_size_hw if image_size_hw is not None else (math.inf, math.inf)
    return f"it lies outside the {width}x{height} (WxH) image by more than {IMAGE_BORDER_TOLERANCE:g} px"


def _centres(boxes: Tensor) -> Tensor:
    """[N, 4] xyxy -> [N, 2] centres ((x1 + x2) / 2, (y1 + y2) / 2), as the official code computes them."""
    return torch.stack(((boxes[:, 2] + boxes[:, 0]) / 2.0, (boxes[:, 3] + boxes[:, 1]) / 2.0), dim=1)


class AtssAssigner:
    """Official ATSS assignment of anchors to ground-truth boxes (no gradient flows through it).

    Args:
        top_k: candidates per level and box (MODEL.ATSS.TOPK 9 times one anchor per location).
    """

    def __init__(self, top_k: int = 9) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k

    def __call__(
        self,
        anchors_per_level: Sequence[Tensor],
        gt_boxes: Tensor,
        image_size_hw: tuple[int, int] | None = None,
        image_index: int = 0,
    ) -> Tensor:
        """Return [A] int64, the assigned box index per anchor (levels concatenated), -1 = unassigned."""
        return self.assign(anchors_per_level, gt_boxes, image_size_hw, image_index).matched_gt_index

    @torch.no_grad()
    def assign(
        self,
        anchors_per_level: Sequence[Tensor],
        gt_boxes: Tensor,
        image_size_hw: tuple[int, int] | None = None,
        image_index: int = 0,
    ) -> AtssAssignment:
        """Assign the anchors of one image.

        Args:
            anchors_per_level: per level l, [A_l, 4] float anchors, legacy xyxy, row-major (y, x) order.
            gt_boxes: [G, 4] float, LEGACY xyxy boxes of this image (G may be 0: nothing is assigned).
            image_size_hw: (H, W) of the unpadded image for the box check; None skips the border check.
            image_index: position of the image in its batch, for error messages.

        Raises:
            ValueError: a box is NaN/inf, empty, or outside the image by more than a pixel.
        """
        check_boxes(from_legacy(gt_boxes), image_size_hw, image_index)
        anchors = torch.cat(list(anchors_per_level), dim=0)
        gt_boxes = gt_boxes.to(anchors.dtype)
        candidate_indices = self._candidates(anchors_per_level, anchors, gt_boxes)
        ious = box_iou_legacy(anchors, gt_boxes)  # [A, G]
        box_indices = torch.arange(gt_boxes.shape[0], device=anchors.device)
        candidate_ious = ious[candidate_indices, box_indices]  # [K, G]
        iou_mean = candidate_ious.mean(dim=0)
        # std of zero columns would only warn about degrees of freedom; an image without boxes has none.
        iou_std = candidate_ious.std(dim=0) if gt_boxes.shape[0] > 0 else iou_mean.clone()
        iou_thresholds = iou_mean + iou_std
        is_inside = self._inside(anchors[candidate_indices], gt_boxes)
        is_positive = (candidate_ious >= iou_thresholds[None, :]) & is_inside
        matched = self._resolve(ious, candidate_indices, is_positive)
        return AtssAssignment(
            matched,
            candidate_indices,
            candidate_ious,
            iou_mean,
            iou_std,
            iou_thresholds,
            is_inside,
            is_positive,
        )

    def _candidates(self, anchors_per_level: Sequence[Tensor], anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """[K, G] global indices of the top-k anchors nearest to each box centre, level by level."""
        # Same expression as the official code so that torch.topk sees bit-identical distances.
        distances = (_centres(anchors)[:, None, :] - _centres(gt_boxes)[None, :, :]).pow(2).sum(-1).sqrt()
        candidates, start = [], 0
        for level_anchors in anchors_per_level:
            end = start + level_anchors.shape[0]
            k = min(self.top_k, level_anchors.shape[0])
            _, nearest = distances[start:end].topk(k, dim=0, largest=False)  # [k, G]
            candidates.append(nearest + start)
            start = end
        return torch.cat(candidates, dim=0)

    @staticmethod
    def _inside(candidate_anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """[K, G, 4] candidate anchors -> [K, G] bool: centre more than 0.01 px inside all box sides."""
        centres_x = (candidate_anchors[..., 2] + candidate_anchors[..., 0]) / 2.0
        centres_y = (candidate_anchors[..., 3] + candidate_anchors[..., 1]) / 2.0
        left, top = centres_x - gt_boxes[:, 0], centres_y - gt_boxes[:, 1]
        right, bottom = gt_boxes[:, 2] - centres_x, gt_boxes[:, 3] - centres_y
        return torch.stack((left, top, right, bottom), dim=-1).amin(dim=-1) > CENTRE_INSIDE_MARGIN

    @staticmethod
    def _resolve(ious: Tensor, candidate_indices: Tensor, is_positive: Tensor) -> Tensor:
        """[A] matched box per anchor: among the boxes it is positive for, the highest IoU (first on ties)."""
        num_anchors, num_boxes = ious.shape
        if num_boxes == 0:
            return torch.full((num_anchors,), -1, dtype=torch.int64, device=ious.device)
        box_indices = torch.arange(num_boxes, device=ious.device).expand_as(candidate_indices)
        positive_ious = torch.full_like(ious, -math.inf)
        anchor_rows, box_columns = candidate_indices[is_positive], box_indices[is_positive]
        positive_ious[anchor_rows, box_columns] = ious[anchor_rows, box_columns]
        best_iou, best_box = positive_ious.max(dim=1)
        return torch.where(best_iou == -math.inf, torch.full_like(best_box, -1), best_box)
