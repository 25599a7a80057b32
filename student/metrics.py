"""Detection and grounding metrics: COCO AP with pycocotools, phrase-grounding recall@1.

Boxes here are continuous xyxy in original-image pixels (DESIGN.md "Boxes"); COCO's xywh is made only at the
boundary with pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CocoMetrics:
    ap: float
    ap50: float
    ap75: float
    num_images: int
    num_detections: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}ap": self.ap, f"{prefix}ap50": self.ap50, f"{prefix}ap75": self.ap75}


def coco_detections(
    image_id: int, boxes: np.ndarray, scores: np.ndarray, category_ids: np.ndarray
) -> list[dict]:
    """COCO result records (bbox xywh) of one image's detections (boxes [N,4] continuous xyxy)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    records = []
    for box, score, category in zip(boxes, np.asarray(scores), np.asarray(category_ids)):
        x0, y0, x1, y1 = (float(v) for v in box)
        records.append(
            {
                "image_id": int(image_id),
                "category_id": int(category),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
            }
        )
    return records


def coco_ap(
    ground_truth: COCO | str,
    detections: Sequence[Mapping],
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
) -> CocoMetrics:
    """COCO box AP / AP50 / AP75 of ``detections`` (COCO result records) against ``ground_truth``.

    ``category_ids`` restricts the evaluation to those categories (``params.catIds``; LVIS's APr is the
    AP over the rare categories of the detections made with the whole vocabulary): detections of other
    categories are ignored, and AP is averaged over these categories only. A restriction to categories with
    no ground-truth box in the evaluated images raises ValueError, as their AP is undefined (not 0).
    """
    coco = ground_truth if isinstance(ground_truth, COCO) else quiet(COCO, ground_truth)
    ids = sorted(coco.getImgIds() if image_ids is None else image_ids)
    if category_ids is not None:
        category_ids = sorted(int(c) for c in category_ids)
        if not category_ids or not coco.getAnnIds(imgIds=ids, catIds=category_ids):
            raise ValueError(f"no ground-truth box of categories {category_ids} in the {len(ids)} images")
        kept = set(category_ids)
        detections = [record for record in detections if record["category_id"] in kept]
    if not detections:
        return CocoMetrics(ap=0.0, ap50=0.0, ap75=0.0, num_images=len(ids), num_detections=0)
    results = quiet(coco.loadRes, list(detections))
    evaluator = COCOeval(coco, results, iouType="bbox")
    evaluator.params.imgIds = ids
    if category_ids is not None:
        evaluator.params.catIds = category_ids
    quiet(evaluator.evaluate)
    quiet(evaluator.accumulate)
    quiet(evaluator.summarize)
    stats = [max(0.0, float(v)) for v in evaluator.stats[:3]]
    return CocoMetrics(
        ap=stats[0], ap50=stats[1], ap75=stats[2], num_images=len(ids), num_detections=len(detections)
    )


def quiet(function, *args):
    """pycocotools prints progress to stdout; library code logs instead."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = function(*args)
    logger.debug(buffer.getvalue())
    return result


def box_iou_numpy(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of continuous xyxy boxes [N,4] x [M,4] -> [N,M]."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    left_top = np.maximum(a[:, None, :2], b[None, :, :2])
    right_bottom = np.minimum(a[:, None, 2:], b[None, :, 2:])
    overlap = np.clip(right_bottom - left_top, 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - overlap
    return np.where(union > 0, overlap / np.maximum(union, 1e-12), 0.0)


def recall_at_1(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
) -> float:
    """Phrase-grounding recall@1 (any-box protocol, as Flickr30k / MDETR).

    ``predictions[i]`` is (boxes [K,4], scores [K]) predicted for phrase i; ``ground_truth[i]`` its true boxes
    [G,4]. A phrase is found when its top-scoring box has IoU >= ``iou_threshold`` with any of its true boxes;
    a phrase with no prediction counts as missed.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} phrases")
    if not ground_truth:
        return 0.0
    found = 0
    for (boxes, scores), truth in zip(predictions, ground_truth):
        if len(boxes) == 0 or len(truth) == 0:
            continue
        top = np.asarray(boxes)[int(np.argmax(scores))]
        found += bool(box_iou_numpy(top[None], truth).max() >= iou_threshold)
    return found / len(ground_truth)
