"""Pseudo-labelled training records: a teacher's finished label shards, read through the engine's Layout.

Every label row with a box scoring above the keep-threshold becomes a grounding ``GroundedImage``: the caption,
per kept box the character span of its phrase, and the image, read by its byte range out of the label tar (or
out of the image shard when the labels were written with label-only tars). The threshold is applied here
(``pipeline.exports.keep_above``): raising it needs no relabeling. Only shards with a ledger entry are read,
in shard order, rows in uid order, so the records are a function of the finished shards; ``exclude_uids``
keeps a verified sample (or anything else) out of training.

At demo scale the records and the member index of every shard are held in memory (a few hundred bytes an
image); a trainer picks records by (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
import pyarrow.compute as pc

from pipeline import storage, tars
from pipeline.exports import iter_labels
from pipeline.layout import Layout
from student.data import GroundedImage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def load_pseudo_labels(
    layout: Layout, teacher: str, threshold: float, exclude_uids: Collection[str] = ()
) -> list[GroundedImage]:
    """The grounding records of ``teacher``'s finished label shards, boxes scoring above ``threshold``.

    Rows left without a box are skipped (they would teach only background), as are ``exclude_uids``. Raises
    ``FileNotFoundError`` when a row's image is in neither its label tar nor its image shard.
    """
    excluded = set(exclude_uids)
    records: list[GroundedImage] = []
    skipped = 0
    for shard, table in iter_labels(layout, teacher, threshold):
        rows = [r for r in table.to_pylist() if r["boxes"] and r["uid"] not in excluded]
        skipped += table.num_rows - len(rows)
        if rows:
            locate = _ImageLocator(layout, teacher, shard)
            records += [_record(row, *locate(row["uid"]), len(records) + n + 1) for n, row in enumerate(rows)]
    logger.info(
        "pseudo-labels of %s above %.3f: %d images (%d skipped)", teacher, threshold, len(records), skipped
    )
    return records


def _record(row: dict, path: str, where: tars.MemberRange, image_id: int) -> GroundedImage:
    boxes = np.asarray([[b["x0"], b["y0"], b["x1"], b["y1"]] for b in row["boxes"]], dtype=np.float32)
    spans = tuple(
        ((row["phrases"][b["phrase"]]["start"], row["phrases"][b["phrase"]]["end"]),) for b in row["boxes"]
    )
    return GroundedImage(
        image_path=path,
        width=int(row["width"]),
        height=int(row["height"]),
        boxes=boxes.reshape(-1, 4),
        caption=row["caption"],
        box_spans=spans,
        image_id=image_id,
        image_range=(where.offset, where.size),
    )


class _ImageLocator:
    """Where each uid's image bytes are: the label tar's ``<uid>.<ext>``, else the image shard's member of
    the ingest row with that uid (label-only tars)."""

    def __init__(self, layout: Layout, teacher: str, shard: str) -> None:
        self.layout, self.shard = layout, shard
        self.label_tar = layout.label_shard(teacher, shard, ".tar")
        self.label_index = tars.member_index(layout.fs, self.label_tar)
        self._image_index: dict | None = None
        self._keys: dict[str, str] | None = None

    def __call__(self, uid: str) -> tuple[str, tars.MemberRange]:
        found = _image_member(self.label_index, uid)
        if found is not None:
            return self.layout.url_of(self.label_tar), found
        if self._image_index is None:
            self._load_image_shard()
        key = self._keys.get(uid)
        found = None if key is None else _image_member(self._image_index, key)
        if found is None:
            raise FileNotFoundError(f"no image for uid {uid} in {self.label_tar} nor in its image shard")
        return self.layout.url_of(self.layout.image_shard(self.shard, ".tar")), found

    def _load_image_shard(self) -> None:
        self._image_index = tars.member_index(self.layout.fs, self.layout.image_shard(self.shard, ".tar"))
        rows = storage.read_parquet(
            self.layout.fs, self.layout.image_shard(self.shard, ".parquet"), ["key", "uid"]
        )
        rows = rows.filter(pc.is_valid(rows.column("uid")))
        self._keys = dict(zip(rows.column("uid").to_pylist(), rows.column("key").to_pylist()))


def _image_member(index: dict[tuple[str, str], tars.MemberRange], key: str) -> tars.MemberRange | None:
    return next((index[(key, suffix)] for suffix in IMAGE_SUFFIXES if (key, suffix) in index), None)
