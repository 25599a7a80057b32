"""Exports of a teacher's pseudo-labels for other trainers: ODVG JSON Lines and MDETR-style COCO JSON.

Both read a teacher's label shards (``Layout.label_shard``) that have a ledger entry (unfinished shards are
never exported), in shard order, rows in uid order, so an export is a function of the finished shards.
``glip-engine export`` (``jobs/export.py``) runs them.

Label shards hold every box above the labeling floor; the keep rule is applied here, where labels are read
(``keep_above``), so one labeling serves every rule: boxes scoring strictly above a threshold, and with
``Keep.phrase_best`` also each phrase's best box scoring above that lower floor (a caption that names a phrase
says its object is there, so its best candidate is kept where a global threshold would drop it).

Box conventions. Label shards hold continuous ``xyxy`` pixels (DESIGN.md "Boxes"). ODVG keeps them as
``[x1, y1, x2, y2]``. COCO gets continuous ``[x, y, w, h]`` with ``w = x1 - x0`` and ``h = y1 - y0``: COCO
boxes are continuous, so no "+1" is added here; the official GLIP loader's ``x2 = x + w - 1`` is its own
"+1" convention and is applied inside ``glip/`` only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.label import label_stage
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.schema import LABEL_SCHEMA, SCHEMA_VERSION, odvg_record, validate

logger = logging.getLogger(__name__)

COCO_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def label_shards(layout: Layout, teacher: str) -> list[str]:
    """The finished label shards of ``teacher`` (those with a ledger entry), sorted."""
    return Ledger(layout, label_stage(teacher)).units()


@dataclass(frozen=True)
class Keep:
    """Which label boxes are kept: those scoring strictly above ``threshold``, and, with ``phrase_best``, each
    phrase's highest-scoring box of its row when it scores strictly above ``phrase_best`` (ties: all)."""

    threshold: float
    phrase_best: float | None = None

    def __post_init__(self) -> None:
        if self.phrase_best is not None and not self.phrase_best <= self.threshold:
            raise ValueError(f"phrase_best {self.phrase_best} must not exceed the threshold {self.threshold}")

    @classmethod
    def of(cls, rule: float | Keep) -> Keep:
        return rule if isinstance(rule, Keep) else cls(float(rule))

    @property
    def floor(self) -> float:
        """The lowest score a kept box may have."""
        return self.threshold if self.phrase_best is None else self.phrase_best

    def mask(self, scores: np.ndarray, rows: np.ndarray, phrases: np.ndarray) -> np.ndarray:
        """[N] bool over N boxes given their scores, row indices and phrase indices within the row (scores
        compared in float32, as stored)."""
        scores = np.asarray(scores, dtype=np.float32)
        kept = scores > np.float32(self.threshold)
        if self.phrase_best is not None and scores.size:
            key = np.asarray(rows, dtype=np.int64) * (int(np.max(phrases)) + 1) + np.asarray(phrases)
            best = np.full(int(key.max()) + 1, -np.inf, dtype=np.float32)
            np.maximum.at(best, key, scores)
            kept |= (scores == best[key]) & (scores > np.float32(self.phrase_best))
        return kept

    def row_boxes(self, boxes: list[dict]) -> list[dict]:
        """The kept boxes of one label row (``LABEL_SCHEMA`` boxes as dicts), in their order."""
        if not boxes:
            return []
        scores = np.asarray([b["score"] for b in boxes], dtype=np.float32)
        phrases = np.asarray([b["phrase"] for b in boxes], dtype=np.int64)
        mask = self.mask(scores, np.zeros(len(boxes), dtype=np.int64), phrases)
        return [box for box, keep in zip(boxes, mask, strict=True) if keep]


def keep_above(table: pa.Table, rule: float | Keep | None) -> pa.Table:
    """``table`` (``LABEL_SCHEMA``) with only the boxes ``rule`` keeps (a threshold: those scoring strictly
    above it; None: all); rows, phrases and box order are kept."""
    if rule is None or table.num_rows == 0:
        return table
    keep = Keep.of(rule)
    boxes = table.column("boxes").combine_chunks()  # list<struct<...>>, one list per row
    flat = boxes.flatten()
    rows = pc.list_parent_indices(boxes).to_numpy()
    kept = keep.mask(
        flat.field("score").to_numpy(zero_copy_only=False),
        rows,
        flat.field("phrase").to_numpy(zero_copy_only=False),
    )
    counts = np.bincount(rows[kept], minlength=table.num_rows)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
    filtered = pa.ListArray.from_arrays(offsets, flat.filter(pa.array(kept)), type=boxes.type)
    return table.set_column(table.schema.get_field_index("boxes"), table.schema.field("boxes"), filtered)


def iter_labels(
    layout: Layout, teacher: str, threshold: float | Keep | None = None
) -> Iterator[tuple[str, pa.Table]]:
    """``(shard, table)`` for every finished label shard of ``teacher``, boxes kept above ``threshold``
    (``keep_above``); tables are checked against ``LABEL_SCHEMA`` (another schema version raises
    ``SchemaError``)."""
    for shard in label_shards(layout, teacher):
        path = layout.label_shard(teacher, shard, ".parquet")
        table = storage.read_parquet(layout.fs, path)
        validate(table, LABEL_SCHEMA, where=path)
        yield shard, keep_above(table, threshold)


def read_labels(
    layout: Layout, teacher: str, threshold: float | Keep | None = None, uids: Collection[str] | None = None
) -> pa.Table:
    """All finished label shards of ``teacher`` as one table (``LABEL_SCHEMA``), boxes above ``threshold``;
    given ``uids``, only their rows, picked shard by shard (a sample of a crawl is read holding the sample)."""
    wanted = None if uids is None else pa.array(sorted(set(uids)), pa.string())
    tables = [
        table if wanted is None else table.filter(pc.is_in(table.column("uid"), wanted))
        for _, table in iter_labels(layout, teacher, threshold)
    ]
    return pa.concat_tables(tables) if tables else LABEL_SCHEMA.empty_table()


def export_odvg(
    layout: Layout, teacher: str, out: str, threshold: float | Keep | None = None, image_extension: str = "jpg",
    **out_options: Any,
) -> int:  # fmt: skip
    """Write every finished label row as one ODVG grounding record per line to ``out`` (an fsspec URL, with
    ``out_options``; default the root's storage options), boxes scoring above ``threshold``.

    ``filename`` is ``<uid>.<image_extension>``, the image's name in the label tars. Returns the number of
    records.
    """
    lines = []
    for _, table in iter_labels(layout, teacher, threshold):
        for row in table.to_pylist():
            record = odvg_record(row, f"{row['uid']}.{image_extension}")
            lines.append(json.dumps(record, sort_keys=True))
    _write_text(out, "".join(line + "\n" for line in lines), out_options or layout.storage_options)
    logger.info("exported %d ODVG records of %s to %s", len(lines), teacher, out)
    return len(lines)


def export_coco(
    layout: Layout, teacher: str, out: str, threshold: float | Keep | None = None, image_extension: str = "jpg",
    **out_options: Any,
) -> dict[str, int]:  # fmt: skip
    """Write the finished labels of ``teacher`` (boxes above ``threshold``) as an MDETR-style COCO grounding
    JSON to ``out``.

    One ``images`` entry per image (``file_name``, ``height``, ``width``, ``caption``, ``uid``), one
    ``annotations`` entry per box (``bbox`` continuous ``[x, y, w, h]``, ``area``, ``iscrowd`` 0,
    ``category_id`` 1, ``tokens_positive`` ``[[start, end]]`` of its phrase, ``phrase``, ``score``), one
    category. Ids count from 1 in shard and uid order. Returns ``{"images": ..., "annotations": ...}``.
    """
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for shard, table in iter_labels(layout, teacher, threshold):
        for row in table.to_pylist():
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": f"{row['uid']}.{image_extension}",
                    "height": row["height"],
                    "width": row["width"],
                    "caption": row["caption"],
                    "uid": row["uid"],
                    "source_shard": shard,
                }
            )
            annotations += [
                _coco_annotation(row, box, image_id, len(annotations) + n + 1)
                for n, box in enumerate(row["boxes"])
            ]
    document = {
        "info": {
            "teacher": teacher,
            "schema_version": SCHEMA_VERSION,
            "box_format": "xywh",
            "threshold": Keep.of(threshold).threshold if threshold is not None else None,
            "phrase_best": Keep.of(threshold).phrase_best if threshold is not None else None,
        },
        "images": images,
        "annotations": annotations,
        "categories": [COCO_CATEGORY],
    }
    _write_text(out, json.dumps(document), out_options or layout.storage_options)
    logger.info("exported %d images, %d boxes of %s to %s", len(images), len(annotations), teacher, out)
    return {"images": len(images), "annotations": len(annotations)}


def _coco_annotation(row: dict[str, Any], box: dict[str, Any], image_id: int, annotation_id: int) -> dict:
    phrase = row["phrases"][box["phrase"]]
    width, height = box["x1"] - box["x0"], box["y1"] - box["y0"]
    return {
        "id": annotation_id,
        "image_id": image_id,
        "bbox": [box["x0"], box["y0"], width, height],
        "area": width * height,
        "iscrowd": 0,
        "category_id": COCO_CATEGORY["id"],
        "tokens_positive": [[phrase["start"], phrase["end"]]],
        "phrase": phrase["text"],
        "score": box["score"],
    }


def _write_text(out: str, text: str, storage_options: dict[str, Any]) -> None:
    fs, path = storage.filesystem(out, **storage_options)
    storage.write_bytes(fs, path, text.encode())
