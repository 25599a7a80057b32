"""The student's reader of pseudo-label shards: kept boxes above a read-time threshold, images by byte range
out of the label tars (or the image shards, for label-only tars), excluded uids left out."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from transformers import AutoTokenizer

from glip.pretrained import minilm_path
from pipeline import storage, tars
from pipeline.label import label_stage
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.schema import LABEL_SCHEMA, url_uid
from student.data import BatchBuilder, make_example, record_image
from student.pseudo import load_pseudo_labels

TEACHER = "t-0123456789"
CAPTION = "a red circle and a blue square"  # phrases: [0, 12) and [17, 30)


def _jpeg(width: int, height: int, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (value, 40, 200 - value)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _row(uid: str, shard: str, width: int, height: int, scores: list[float]) -> dict:
    boxes = [{"phrase": i % 2, "x0": 2.0 + i, "y0": 3.0, "x1": 30.0 + i, "y1": 40.0, "score": s}
             for i, s in enumerate(scores)]  # fmt: skip
    return {"uid": uid, "url": None, "sha256": None, "source_shard": shard, "width": width, "height": height,
            "caption": CAPTION, "phrases": [{"text": "a red circle", "start": 0, "end": 12},
                                            {"text": "a blue square", "start": 17, "end": 30}],
            "boxes": boxes, "teacher": TEACHER, "config_hash": "c",
            "created_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip


def _labelled_root(root: str, label_only: bool) -> tuple[Layout, dict[str, tuple[int, int, bytes]]]:
    """Two finished label shards and one unfinished; returns ``uid -> (width, height, jpeg)``."""
    layout = Layout(root)
    images: dict[str, tuple[int, int, bytes]] = {}
    for number, scores_per_row in enumerate([[[0.9, 0.4], [0.2]], [[0.6], [0.7, 0.8, 0.45]], [[0.99]]]):
        shard = f"day1/{number:05d}"
        rows, ingest_rows, label_samples, image_samples = [], [], [], []
        for index, scores in enumerate(scores_per_row):
            uid = url_uid(f"http://example.com/{number}/{index}.jpg")
            width, height = 48 + 8 * index, 64 + 4 * number
            images[uid] = (width, height, _jpeg(width, height, 30 * index + number))
            rows.append(_row(uid, shard, width, height, scores))
            key = f"{number:04d}{index:05d}"
            ingest_rows.append({"key": key, "uid": uid})
            image_samples.append({"__key__": key, "jpg": images[uid][2], "txt": CAPTION.encode()})
            label_samples.append(
                {"__key__": uid, "json": b"{}", **({} if label_only else {"jpg": images[uid][2]})}
            )
        table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["uid"]), schema=LABEL_SCHEMA)
        storage.write_parquet(layout.fs, layout.label_shard(TEACHER, shard, ".parquet"), table)
        tars.write_samples(
            layout.fs,
            layout.label_shard(TEACHER, shard, ".tar"),
            sorted(label_samples, key=lambda s: s["__key__"]),
        )
        tars.write_samples(layout.fs, layout.image_shard(shard, ".tar"), image_samples)
        storage.write_parquet(
            layout.fs, layout.image_shard(shard, ".parquet"), pa.Table.from_pylist(ingest_rows)
        )
        if number < 2:  # the third shard has no ledger entry: unfinished, never read
            Ledger(layout, label_stage(TEACHER)).record(shard, {})
    return layout, images


@pytest.mark.parametrize("label_only", [False, True], ids=["images-in-label-tars", "label-only-tars"])
def test_records_hold_the_kept_boxes_and_read_their_images(tmp_path, label_only: bool) -> None:
    layout, images = _labelled_root(str(tmp_path / "root"), label_only)
    records = load_pseudo_labels(layout, TEACHER, threshold=0.5)
    # Kept above 0.5: row 0/0 (0.9), 1/0 (0.6), 1/1 (0.7, 0.8); row 0/1 (0.2 only) and shard 2 (unfinished) not.
    assert sorted(len(r.boxes) for r in records) == [1, 1, 2]
    for record in records:
        width, height, jpeg = next(v for v in images.values() if v[:2] == (record.width, record.height))
        image = record_image(record)
        assert image.size == (width, height)
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
        assert record.caption == CAPTION and len(record.box_spans) == len(record.boxes)
        assert all(spans[0] in ((0, 12), (17, 30)) for spans in record.box_spans)
    assert len(load_pseudo_labels(layout, TEACHER, threshold=0.3)) == 3  # 0.4 is above 0.3: still 3 rows
    assert len(load_pseudo_labels(layout, TEACHER, threshold=0.95)) == 0


def test_excluded_uids_never_reach_training_and_records_make_batches(tmp_path) -> None:
    layout, images = _labelled_root(str(tmp_path / "root"), label_only=False)
    every = load_pseudo_labels(layout, TEACHER, threshold=0.5)
    excluded = url_uid("http://example.com/1/1.jpg")
    kept = load_pseudo_labels(layout, TEACHER, threshold=0.5, exclude_uids={excluded})
    assert len(kept) == len(every) - 1
    assert all((r.width, r.height) != images[excluded][:2] for r in kept)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # bert-base-uncased vocabulary, shipped offline
    rng = random.Random(0)
    examples = [make_example(record, None, tokenizer, rng) for record in kept]
    batch = BatchBuilder(tokenizer, min_size=64, max_size=96)(examples, rng)
    assert batch.images.shape[0] == len(kept) and [len(b) for b in batch.boxes] == [
        len(r.boxes) for r in kept
    ]
