"""Pseudo-labelled training records: a teacher's finished label shards, read through the engine's Layout.

Every label row with a box scoring above the keep-threshold becomes a grounding ``GroundedImage``: the caption,
per kept box the character span of its phrase, and the image, read by its byte range out of the label tar (or
out of the image shard when the labels were written with label-only tars). The threshold is applied here
(``pipeline.exports.keep_above``): raising it needs no relabeling. Only shards with a ledger entry are read,
in shard order, rows in uid order, so the records are a function of the finished shards; ``exclude_uids``
keeps a verified sample (or anything else) out of training.

Two read-time options for the objects the threshold leaves out (about 40% of those a caption names at 0.5):
``ignore_low`` gives each record the teacher's candidates scoring in ``(ignore_low, threshold]`` as ignore
boxes (``ignore_band``: training leaves the anchors they would claim out of the token loss), and
``unlabelled_phrases`` gives it the phrases with no kept box (``unlabelled_spans``: their tokens are left out
of the token loss). Both off, the records are as without them.

Rounds read them two ways. A round that draws whole pseudo-labelled images holds the records
(``load_pseudo_labels``, a list: ~2.0 KB an image, 215 B pickled, on the seed-2 demo root); a trainer picks
records by (seed, step), so a resumed run sees the same batches. A pasting round (the default: the crawl comes in
as objects pasted into human images, ``student.paste``) holds none: ``iter_pseudo_labels`` reads one shard at a
time into ``student.paste.paste_pool``, which keeps each kept box as a row of columns (``bench/pool_memory.py``).

At scale (24M images: ~39 GB of records held, ~5 GB pickled) a round that draws whole images could keep the same
rule without holding the records (not built): the trainer would keep an index of the finished shards (shard name,
row count; fixed when the run starts and saved in its train state), an epoch would be a permutation of shards
seeded by (seed, epoch) followed by a permutation of rows within a window of shards seeded by (seed, epoch,
window), and step s's global positions [s*B, (s+1)*B) map to (shard, row) arithmetically. The stream position
would then be the step number alone, already in ``train_state.pt``: a resumed run, or a rank of any data-parallel
width, would read exactly the rows of its steps, each by its shard's byte ranges. Shards labelled after the run
started would wait for the next run (or round).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterator

import numpy as np
import pyarrow.compute as pc

from pipeline import storage, tars
from pipeline.exports import Keep, iter_labels
from pipeline.layout import Layout
from student.data import GroundedImage, Span

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def load_pseudo_labels(
    layout: Layout,
    teacher: str,
    threshold: float | Keep,
    exclude_uids: Collection[str] = (),
    ignore_low: float | None = None,
    unlabelled_phrases: bool = False,
) -> list[GroundedImage]:
    """The grounding records of ``teacher``'s finished label shards, the boxes ``threshold`` keeps (a float:
    those scoring above it; an ``exports.Keep``: also each phrase's best box above its ``phrase_best``), as a
    list: ``iter_pseudo_labels``'s records, held."""
    return list(iter_pseudo_labels(layout, teacher, threshold, exclude_uids, ignore_low, unlabelled_phrases))


def iter_pseudo_labels(
    layout: Layout,
    teacher: str,
    threshold: float | Keep,
    exclude_uids: Collection[str] = (),
    ignore_low: float | None = None,
    unlabelled_phrases: bool = False,
) -> Iterator[GroundedImage]:
    """The grounding records of ``teacher``'s finished label shards, the boxes ``threshold`` keeps, one shard
    read at a time (what the caller keeps of them is all that is held).

    Rows left without a box are skipped (they would teach only background), as are ``exclude_uids``. Raises
    ``FileNotFoundError`` (when the records are read) when a row's image is in neither its label tar nor its
    image shard.

    Args:
        ignore_low: given, every record carries the boxes scoring above ``ignore_low`` that are not kept as its
            ``ignore_boxes`` / ``ignore_spans`` (``ignore_band``); it must be below the lowest kept score
            (``ValueError`` here, not when the records are read).
        unlabelled_phrases: every record carries the phrases with no kept box as its ``unlabelled_spans``
            (``unlabelled_spans``).
    """
    keep = Keep.of(threshold)
    if ignore_low is not None and not ignore_low < keep.floor:
        raise ValueError(f"ignore_low {ignore_low} must be below the lowest kept score {keep.floor}")
    if ignore_low is not None or unlabelled_phrases:
        return _iter_with_options(layout, teacher, keep, set(exclude_uids), ignore_low, unlabelled_phrases)
    return _iter_plain(layout, teacher, keep, set(exclude_uids))


def _iter_plain(layout: Layout, teacher: str, keep: Keep, excluded: set[str]) -> Iterator[GroundedImage]:
    images = skipped = 0
    for shard, table in iter_labels(layout, teacher, keep):
        rows = [r for r in table.to_pylist() if r["boxes"] and r["uid"] not in excluded]
        skipped += table.num_rows - len(rows)
        if rows:
            locate = _ImageLocator(layout, teacher, shard)
            for row in rows:
                images += 1
                yield _record(row, *locate(row["uid"]), images)
    logger.info("pseudo-labels of %s (%s): %d images (%d skipped)", teacher, keep, images, skipped)


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
        pseudo=True,
    )


def ignore_band(
    row: dict, threshold: float | Keep, ignore_low: float
) -> tuple[np.ndarray, tuple[tuple[Span, ...], ...]]:
    """The ignore band of a label row (``LABEL_SCHEMA``, as a dict): the boxes scoring above ``ignore_low``
    that ``threshold`` does not keep.

    Returns:
        ``[M, 4]`` float32 continuous xyxy original pixels, and per box the character spans of its phrase.
    """
    kept = {id(box) for box in Keep.of(threshold).row_boxes(row["boxes"])}
    band = [b for b in row["boxes"] if _above(b["score"], ignore_low) and id(b) not in kept]
    boxes = np.asarray([[b["x0"], b["y0"], b["x1"], b["y1"]] for b in band], dtype=np.float32)
    return boxes.reshape(-1, 4), tuple((_phrase_span(row, b["phrase"]),) for b in band)


def unlabelled_spans(row: dict, threshold: float | Keep) -> tuple[tuple[Span, ...], ...]:
    """Per phrase of a label row with no box that ``threshold`` keeps, its character spans."""
    labelled = {b["phrase"] for b in Keep.of(threshold).row_boxes(row["boxes"])}
    return tuple((_phrase_span(row, index),) for index in range(len(row["phrases"])) if index not in labelled)


def _above(score: float, threshold: float) -> bool:
    """``score > threshold`` compared in float32, as ``pipeline.exports.keep_above`` compares them."""
    return bool(np.float32(score) > np.float32(threshold))


def _phrase_span(row: dict, index: int) -> Span:
    phrase = row["phrases"][index]
    return (int(phrase["start"]), int(phrase["end"]))


def _iter_with_options(
    layout: Layout,
    teacher: str,
    keep: Keep,
    excluded: set[str],
    ignore_low: float | None,
    unlabelled_phrases: bool,
) -> Iterator[GroundedImage]:
    """``iter_pseudo_labels`` with an ignore band and/or unlabelled phrases: rows are read down to
    ``ignore_low`` (or the labeling floor) and split by ``keep`` here; the kept boxes are exactly those read
    with ``keep``."""
    images = skipped = band = 0
    for shard, table in iter_labels(layout, teacher, keep.floor if ignore_low is None else ignore_low):
        rows = [row for row in table.to_pylist() if row["uid"] not in excluded]
        kept = [{**row, "boxes": keep.row_boxes(row["boxes"])} for row in rows]
        pairs = [(row, kept_row) for row, kept_row in zip(rows, kept, strict=True) if kept_row["boxes"]]
        skipped += table.num_rows - len(pairs)
        if not pairs:
            continue
        locate = _ImageLocator(layout, teacher, shard)
        for row, kept_row in pairs:
            images += 1
            record = _record(kept_row, *locate(row["uid"]), images)
            if ignore_low is not None:
                boxes, spans = ignore_band(row, keep, ignore_low)
                record = dataclasses.replace(record, ignore_boxes=boxes, ignore_spans=spans)
                band += len(boxes)
            if unlabelled_phrases:
                record = dataclasses.replace(record, unlabelled_spans=unlabelled_spans(row, keep))
            yield record
    logger.info(
        "pseudo-labels of %s (%s): %d images (%d skipped), %d ignore boxes down to %s",
        teacher,
        keep,
        images,
        skipped,
        band,
        ignore_low,
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
