"""Evaluate a GLIP: COCO AP / AP50 with pycocotools (vocabulary prompts, chunked past 256 tokens) and
phrase-grounding recall@1 on MDETR-style grounding data."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from tqdm import tqdm

from glip.predictor import GlipPredictor
from glip.prompts import Prompt
from student.data import GroundedImage, load_coco_detection, load_grounding, read_image
from student.metrics import CocoMetrics, coco_ap, coco_detections, quiet, recall_at_1

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    ap: float
    ap50: float
    recall_at_1: float | None
    images: int
    seconds: float

    def as_dict(self, prefix: str = "") -> dict[str, float | None]:
        return {f"{prefix}ap": self.ap, f"{prefix}ap50": self.ap50, f"{prefix}r1": self.recall_at_1}


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_detection(
    predictor: GlipPredictor,
    coco_json: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
) -> CocoMetrics:
    """COCO box AP of ``predictor`` prompted with every category name of ``coco_json``."""
    records, names = load_coco_detection(coco_json, image_root)
    records = records[:limit] if limit else records
    coco = quiet(COCO, str(coco_json))
    category_ids = np.asarray(sorted(coco.getCatIds()))
    results: list[dict] = []
    for batch in tqdm(list(_batches(records, batch_size)), desc="eval AP", unit="batch", disable=None):
        images = [read_image(record.image_path) for record in batch]
        for record, found in zip(batch, predictor.predict_vocabulary(images, names)):
            results += coco_detections(
                record.image_id,
                found.boxes.numpy(),
                found.scores.numpy(),
                category_ids[found.phrase_indices.numpy()],
            )
    return coco_ap(coco, results, [record.image_id for record in records])


def _grounding_prompt(record: GroundedImage) -> tuple[Prompt, list[np.ndarray]]:
    """The caption's distinct phrases as a prompt, and the true boxes of each phrase."""
    phrases: dict[tuple, list[np.ndarray]] = {}
    for spans, box in zip(record.box_spans or (), record.boxes):
        phrases.setdefault(spans, []).append(box)
    prompt = Prompt.from_caption(record.caption or "", list(phrases))
    return prompt, [np.stack(boxes) for boxes in phrases.values()]


def evaluate_grounding(
    predictor: GlipPredictor,
    grounding_json: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
) -> float:
    """Recall@1 over every phrase of every caption (a phrase is found when its top box has IoU >= 0.5)."""
    records = [r for r in load_grounding(grounding_json, image_root) if r.box_spans]
    records = records[:limit] if limit else records
    predictions, truths = [], []
    for batch in tqdm(list(_batches(records, batch_size)), desc="eval R@1", unit="batch", disable=None):
        prompts, batch_truths = zip(*(_grounding_prompt(record) for record in batch))
        images = [read_image(record.image_path) for record in batch]
        for truth, found in zip(batch_truths, predictor.predict(images, list(prompts))):
            for phrase, phrase_truth in enumerate(truth):
                chosen = found.phrase_indices == phrase
                predictions.append((found.boxes[chosen].numpy(), found.scores[chosen].numpy()))
                truths.append(phrase_truth)
    return recall_at_1(predictions, truths)


def evaluate(
    predictor: GlipPredictor,
    coco_json: str | Path,
    grounding_json: str | Path | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
) -> EvalResult:
    """AP / AP50 on ``coco_json`` and, if given, R@1 on ``grounding_json`` (same images)."""
    began = time.perf_counter()
    detection = evaluate_detection(predictor, coco_json, image_root, batch_size, limit)
    recall = None
    if grounding_json is not None:
        recall = evaluate_grounding(predictor, grounding_json, image_root, batch_size, limit)
    seconds = time.perf_counter() - began
    logger.info(
        "AP %.3f AP50 %.3f R@1 %s on %d images in %.1fs",
        detection.ap,
        detection.ap50,
        recall,
        detection.num_images,
        seconds,
    )
    return EvalResult(detection.ap, detection.ap50, recall, detection.num_images, seconds)
