"""Evaluate a GLIP: COCO AP / AP50 with pycocotools (vocabulary prompts, chunked past 256 tokens), LVIS-style
AP over the rare names (APr), and phrase-grounding recall@1 on MDETR-style grounding data."""

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


class MissingMetricError(ValueError):
    """A metric that was asked for was not measured."""


@dataclass(frozen=True)
class EvalResult:
    """Held-out metrics of one model.

    ``ap`` / ``ap50``: COCO AP and AP50 over every name, prompted with every name. ``ap_rare`` (APr, as LVIS):
    AP over the categories of ``rare_names`` of those same detections. ``ap_rare_prompt``: AP over the rare
    names prompted with the rare names alone. ``recall_at_1``: phrase-grounding R@1. A metric that was not
    measured is None (no grounding json; no rare names; no box of a rare name in the images evaluated).
    """

    ap: float
    ap50: float
    recall_at_1: float | None
    images: int
    seconds: float
    ap_rare: float | None = None
    ap_rare_prompt: float | None = None
    rare_names: tuple[str, ...] = ()

    def as_dict(self, prefix: str = "", strict: bool = False) -> dict[str, float | None]:
        """``{prefix}ap, ap50, apr, apr_prompt, r1``; ``strict``: a metric not measured raises
        MissingMetricError instead of being None."""
        values = {
            "ap": self.ap,
            "ap50": self.ap50,
            "apr": self.ap_rare,
            "apr_prompt": self.ap_rare_prompt,
            "r1": self.recall_at_1,
        }
        missing = [name for name, value in values.items() if value is None]
        if strict and missing:
            raise MissingMetricError(
                f"not measured: {', '.join(missing)} (R@1 needs a grounding json; APr needs rare names and a "
                f"box of one in the images evaluated; rare names given: {len(self.rare_names)})"
            )
        return {prefix + name: value for name, value in values.items()}


@dataclass(frozen=True)
class DetectionMetrics:
    """COCO AP of one vocabulary evaluation: ``all_names`` over every category with the all-names prompt;
    ``rare`` over the rare categories of the same detections (APr); ``rare_prompt`` over the rare
    categories prompted with the rare names alone. None where not measured."""

    all_names: CocoMetrics
    rare: CocoMetrics | None
    rare_prompt: CocoMetrics | None


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _rare_ids(names: Sequence[str], category_ids: np.ndarray, rare_names: Sequence[str]) -> np.ndarray:
    """COCO category ids of ``rare_names`` in their order; an unknown or repeated name raises ValueError."""
    ids = dict(zip(names, category_ids.tolist()))
    unknown = [name for name in rare_names if name not in ids]
    if unknown or len(set(rare_names)) != len(rare_names):
        raise ValueError(f"rare names {list(rare_names)} must be distinct category names; unknown: {unknown}")
    return np.asarray([ids[name] for name in rare_names], dtype=np.int64)


def evaluate_vocabulary(
    predictor: GlipPredictor,
    coco_json: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    rare_names: Sequence[str] = (),
    rare_prompt: bool = True,
) -> DetectionMetrics:
    """COCO box AP of ``predictor`` prompted with every category name of ``coco_json``; with ``rare_names``
    (category names of ``coco_json``) also APr and, if ``rare_prompt``, the AP of a rare-names-only prompt.

    APr is None (logged) when the images evaluated hold no box of a rare name.
    """
    records, names = load_coco_detection(coco_json, image_root)
    records = records[:limit] if limit else records
    coco = quiet(COCO, str(coco_json))
    category_ids = np.asarray(sorted(coco.getCatIds()))
    rare_ids = _rare_ids(names, category_ids, rare_names)
    prompts = {"all": (list(names), category_ids)}
    if len(rare_names) and rare_prompt:
        prompts["rare"] = (list(rare_names), rare_ids)
    results: dict[str, list[dict]] = {key: [] for key in prompts}
    for batch in tqdm(list(_batches(records, batch_size)), desc="eval AP", unit="batch", disable=None):
        images = [read_image(record.image_path) for record in batch]
        for key, (vocabulary, ids) in prompts.items():
            for record, found in zip(batch, predictor.predict_vocabulary(images, vocabulary)):
                boxes, scores = found.boxes.numpy(), found.scores.numpy()
                results[key] += coco_detections(
                    record.image_id, boxes, scores, ids[found.phrase_indices.numpy()]
                )
    image_ids = [record.image_id for record in records]
    all_names = coco_ap(coco, results["all"], image_ids)
    if not len(rare_ids):
        return DetectionMetrics(all_names, None, None)
    if not coco.getAnnIds(imgIds=image_ids, catIds=rare_ids.tolist()):
        logger.warning("no box of a rare name in the %d images evaluated: APr not measured", len(image_ids))
        return DetectionMetrics(all_names, None, None)
    rare = coco_ap(coco, results["all"], image_ids, rare_ids.tolist())
    prompted = coco_ap(coco, results["rare"], image_ids, rare_ids.tolist()) if "rare" in results else None
    return DetectionMetrics(all_names, rare, prompted)


def evaluate_detection(
    predictor: GlipPredictor,
    coco_json: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
) -> CocoMetrics:
    """COCO box AP of ``predictor`` prompted with every category name of ``coco_json``."""
    return evaluate_vocabulary(predictor, coco_json, image_root, batch_size, limit).all_names


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
    rare_names: Sequence[str] = (),
    rare_prompt: bool = True,
) -> EvalResult:
    """AP / AP50 on ``coco_json``, with ``rare_names`` APr (and the rare-prompt AP unless not
    ``rare_prompt``), and, if given, R@1 on ``grounding_json`` (same images)."""
    began = time.perf_counter()
    rare_names = tuple(rare_names)
    detection = evaluate_vocabulary(
        predictor, coco_json, image_root, batch_size, limit, rare_names, rare_prompt
    )
    recall = None
    if grounding_json is not None:
        recall = evaluate_grounding(predictor, grounding_json, image_root, batch_size, limit)
    seconds = time.perf_counter() - began
    every, rare, prompted = detection.all_names, detection.rare, detection.rare_prompt
    result = EvalResult(
        every.ap,
        every.ap50,
        recall,
        every.num_images,
        seconds,
        ap_rare=None if rare is None else rare.ap,
        ap_rare_prompt=None if prompted is None else prompted.ap,
        rare_names=rare_names,
    )
    logger.info(
        "AP %.3f APr %s (rare prompt %s) AP50 %.3f R@1 %s on %d images in %.1fs",
        result.ap,
        result.ap_rare,
        result.ap_rare_prompt,
        result.ap50,
        recall,
        result.images,
        seconds,
    )
    return result
