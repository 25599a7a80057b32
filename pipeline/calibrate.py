"""Keep-threshold calibration: the lowest threshold whose pseudo-label precision on a verified sample reaches a
target.

The teacher's scores bunch between 0.3 and 0.7 and the threshold moves precision and recall steeply, so a
round chooses its keep-threshold on a small sample of the crawl that a person checked (a COCO detection JSON
whose images carry the engine's ``uid``; the demo world ships one, ``annotations/verified_coco.json``). Labels
are made once at a floor score; each candidate threshold is applied at read time (``exports.keep_above``) and
measured with ``quality`` (a box is a true positive when its phrase names the category of a verified box it
overlaps at IoU >= 0.5). The verified images must stay out of training and out of every reported metric:
``Calibration.uids`` says which they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.exports import Keep, keep_above
from pipeline.quality import quality

logger = logging.getLogger(__name__)

DEFAULT_TARGET = 0.9
DEFAULT_THRESHOLDS = tuple(round(float(t), 2) for t in np.arange(0.30, 0.96, 0.01))


@dataclass(frozen=True)
class Calibration:
    """The chosen keep-threshold and how it was chosen.

    ``threshold``: the lowest candidate whose precision reached ``target`` (``met``), else the candidate of
    highest precision. ``curve``: per candidate ``(threshold, precision, recall, boxes)`` on the sample.
    """

    threshold: float
    precision: float | None
    recall: float | None
    met: bool
    target: float
    images: int
    uids: tuple[str, ...]
    curve: tuple[tuple[float, float | None, float | None, int], ...]

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["uids"] = list(self.uids)
        values["curve"] = [list(point) for point in self.curve]
        return values


def verified_truth(coco: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``uid -> {"boxes": [{"bbox": xyxy, "category": name}], "mentions": [...]}`` of a verified COCO document,
    in ``quality``'s truth format. Every verified box counts for recall (a person checked the image for the
    objects its caption names): each gets a mention with an empty span, which names no phrase, so a phrase
    is named by the words it shares with a category."""
    names = {category["id"]: category["name"] for category in coco["categories"]}
    truth: dict[str, dict[str, Any]] = {
        image["uid"]: {"boxes": [], "mentions": []} for image in coco["images"]
    }
    uid_of = {image["id"]: image["uid"] for image in coco["images"]}
    for annotation in coco["annotations"]:
        x, y, width, height = annotation["bbox"]
        entry = truth[uid_of[annotation["image_id"]]]
        name = names[annotation["category_id"]]
        entry["mentions"].append({"start": 0, "end": 0, "category": name, "boxes": [len(entry["boxes"])]})
        entry["boxes"].append({"bbox": [x, y, x + width, y + height], "category": name})
    return truth


def calibrate(
    labels: pa.Table,
    verified: Mapping[str, Any],
    target: float = DEFAULT_TARGET,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    phrase_best: float | None = None,
) -> Calibration:
    """Choose the keep-threshold of ``labels`` (``LABEL_SCHEMA`` rows, boxes above the labeling floor) on the
    verified COCO document ``verified``; with ``phrase_best``, each candidate threshold is read with the
    phrase-best rule (``exports.Keep``) and thresholds below it are not candidates.

    Raises:
        ValueError: no label row belongs to the verified sample (it was not labelled, or uids differ).
    """
    truth = verified_truth(verified)
    sample = labels.filter(pc.is_in(labels.column("uid"), pa.array(sorted(truth), pa.string())))
    if sample.num_rows == 0:
        raise ValueError(
            f"none of the {len(truth)} verified images is among the {labels.num_rows} label rows"
        )
    curve = []
    for threshold in sorted(t for t in thresholds if phrase_best is None or t >= phrase_best):
        report = quality(keep_above(sample, Keep(threshold, phrase_best)), truth)
        curve.append((float(threshold), report.precision, report.recall, report.boxes))
    reached = [point for point in curve if point[1] is not None and point[1] >= target]
    chosen = reached[0] if reached else max(curve, key=lambda point: (point[1] or 0.0, -point[0]))
    if not reached:
        logger.warning("no threshold reaches precision %.2f on the verified sample; best %s", target, chosen)
    return Calibration(chosen[0], chosen[1], chosen[2], bool(reached), target, sample.num_rows,
                       tuple(sorted(truth)), tuple(curve))  # fmt: skip


def read_verified(url: str, **storage_options: Any) -> dict[str, Any]:
    """A verified COCO document from any fsspec URL."""
    with fsspec.open(url, "rb", **storage_options) as handle:
        return json.load(handle)
