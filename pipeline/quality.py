"""Pseudo-label precision and recall against known true boxes (the demo world's ``crawl_truth.json``).

Truth, per uid: ``boxes`` (``bbox`` continuous xyxy pixels, ``category`` such as "purple star") and
``mentions`` (caption spans ``start``/``end`` with the ``category`` they name and the indices of the
``boxes`` they refer to).

Matching, per image: a label box takes the object name of its phrase: the category of the mention whose
span overlaps the phrase's span most, else the longest truth category (of that image) whose words all
appear in the phrase text (plural ``s``/``es`` ignored), else none. Boxes are taken by score, highest
first; a box is a true positive when its IoU with a not yet matched truth box of the same name is at least
``iou_threshold`` (the best such box is matched). Precision is over all label boxes of images that have a
truth entry; recall is over the truth boxes that some mention refers to (objects the caption names).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
from torchvision.ops import box_iou

_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class QualityReport:
    """Counts and rates of one comparison; rates are None when their denominator is zero.

    Attributes:
        images: label rows with a truth entry (rows without one are ``images_without_truth``).
        boxes: label boxes scoring at least ``min_score`` on those images.
        true_positives: boxes matched to a truth box of the same name.
        unnamed_boxes: boxes whose phrase names no truth object of the image (all false positives).
        mentioned_truth: truth boxes a caption mention refers to.
        mentioned_found: of those, the ones matched by a box.
    """

    images: int
    images_without_truth: int
    boxes: int
    true_positives: int
    unnamed_boxes: int
    mentioned_truth: int
    mentioned_found: int
    precision: float | None
    recall: float | None
    iou_threshold: float
    min_score: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _ImageCounts:
    boxes: int = 0
    true_positives: int = 0
    unnamed: int = 0
    mentioned: int = 0
    found: int = 0


def quality(
    labels: pa.Table | Iterable[pa.Table],
    truth: Mapping[str, Any],
    iou_threshold: float = 0.5,
    min_score: float = 0.0,
) -> QualityReport:
    """Precision / recall of the label rows ``labels`` (``LABEL_SCHEMA`` columns uid, phrases, boxes).

    Args:
        labels: pseudo-label rows: a table, or tables read one at a time (e.g. ``exports.iter_labels``'s: a
            crawl's labels are counted holding one shard).
        truth: the ``crawl_truth.json`` document, or its ``samples`` mapping (uid -> entry).
        iou_threshold: minimum IoU of a true positive.
        min_score: only boxes scoring at least this count (to read precision at a stricter threshold).
    """
    samples = truth.get("samples", truth)
    totals = _ImageCounts()
    images = missing = 0
    for table in [labels] if isinstance(labels, pa.Table) else labels:
        for row in table.select(["uid", "phrases", "boxes"]).to_pylist():
            entry = samples.get(row["uid"])
            if entry is None:
                missing += 1
                continue
            images += 1
            boxes = [b for b in row["boxes"] if b["score"] >= min_score]
            counts = _image_counts(row["phrases"], boxes, entry, iou_threshold)
            totals = _ImageCounts(
                *(a + b for a, b in zip(dataclasses.astuple(totals), dataclasses.astuple(counts)))
            )
    return QualityReport(
        images=images,
        images_without_truth=missing,
        boxes=totals.boxes,
        true_positives=totals.true_positives,
        unnamed_boxes=totals.unnamed,
        mentioned_truth=totals.mentioned,
        mentioned_found=totals.found,
        precision=totals.true_positives / totals.boxes if totals.boxes else None,
        recall=totals.found / totals.mentioned if totals.mentioned else None,
        iou_threshold=iou_threshold,
        min_score=min_score,
    )


def _image_counts(
    phrases: Sequence[Mapping], boxes: Sequence[Mapping], entry: Mapping, iou_threshold: float
) -> _ImageCounts:
    truth_boxes = entry.get("boxes") or []
    mentions = entry.get("mentions") or []
    categories = sorted({t["category"] for t in truth_boxes})
    names = [phrase_category(p, mentions, categories) for p in phrases]
    matched: set[int] = set()
    true_positives = unnamed = 0
    for box in sorted(boxes, key=lambda b: -b["score"]):
        name = names[box["phrase"]]
        if name is None:
            unnamed += 1
            continue
        hit = _best_match(box, name, truth_boxes, matched, iou_threshold)
        if hit is not None:
            matched.add(hit)
            true_positives += 1
    mentioned = {i for m in mentions for i in m.get("boxes", [])}
    return _ImageCounts(len(boxes), true_positives, unnamed, len(mentioned), len(mentioned & matched))


def _best_match(
    box: Mapping, name: str, truth_boxes: Sequence[Mapping], matched: set[int], iou_threshold: float
) -> int | None:
    candidates = [i for i, t in enumerate(truth_boxes) if t["category"] == name and i not in matched]
    if not candidates:
        return None
    predicted = torch.tensor([[box["x0"], box["y0"], box["x1"], box["y1"]]], dtype=torch.float64)
    targets = torch.tensor([truth_boxes[i]["bbox"] for i in candidates], dtype=torch.float64)
    overlaps = box_iou(predicted, targets)[0]  # [len(candidates)]
    best = int(torch.argmax(overlaps))
    return candidates[best] if float(overlaps[best]) >= iou_threshold else None


def phrase_category(phrase: Mapping, mentions: Sequence[Mapping], categories: Sequence[str]) -> str | None:
    """The object name a phrase refers to: the best-overlapping mention's category, else the longest
    category whose words all occur in the phrase (singular or plural), else None."""
    overlaps = [
        (min(phrase["end"], m["end"]) - max(phrase["start"], m["start"]), m["category"]) for m in mentions
    ]
    overlaps = [o for o in overlaps if o[0] > 0]
    if overlaps:
        return max(overlaps, key=lambda o: o[0])[1]
    words = set()
    for word in _WORD.findall(phrase["text"].lower()):
        words |= {word, word.removesuffix("s"), word.removesuffix("es")}
    named = [c for c in categories if set(_WORD.findall(c.lower())) <= words]
    return max(named, key=lambda c: (len(c.split()), c)) if named else None
