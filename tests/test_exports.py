"""Exports (COCO loads in pycocotools, ODVG field names) and pseudo-label quality on hand-made tables."""

from __future__ import annotations

import json
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from pipeline import storage
from pipeline.exports import Keep, export_coco, export_odvg, read_labels
from pipeline.label import label_stage
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.quality import phrase_category, quality
from pipeline.schema import LABEL_SCHEMA, SchemaError

TEACHER = "demo-0123456789"
CAPTION = "Two purple stars and a red cross, free HD wallpaper"
PHRASES = [
    {"text": "Two purple stars", "start": 0, "end": 16},
    {"text": "a red cross", "start": 21, "end": 32},
]


def _box(phrase, x0, y0, x1, y1, score):
    return {"phrase": phrase, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "score": score}


def _row(uid: str, boxes: list[dict], shard: str = "p/00000") -> dict:
    return {
        "uid": uid,
        "url": f"http://x/{uid}.jpg",
        "sha256": "00",
        "source_shard": shard,
        "width": 300,
        "height": 200,
        "caption": CAPTION,
        "phrases": PHRASES,
        "boxes": boxes,
        "teacher": TEACHER,
        "config_hash": "cfg",
        "created_at": "2025-01-01T00:00:00+00:00",
    }


def _write_shard(layout: Layout, shard: str, rows: list[dict], finished: bool = True) -> None:
    table = pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)
    storage.write_parquet(layout.fs, layout.label_shard(TEACHER, shard, ".parquet"), table)
    if finished:
        Ledger(layout, label_stage(TEACHER)).record(shard, {"images": len(rows)})


@pytest.fixture
def layout(tmp_path) -> Layout:
    layout = Layout(str(tmp_path / "root"))
    _write_shard(
        layout,
        "p/00000",
        [
            _row("aaaa", [_box(0, 10.5, 20.25, 60.5, 70.25, 0.9), _box(1, 100.0, 50.0, 150.0, 120.0, 0.7)]),
            _row("bbbb", []),
        ],
    )
    _write_shard(layout, "p/00001", [_row("cccc", [_box(1, 0.0, 0.0, 300.0, 200.0, 0.55)], "p/00001")])
    _write_shard(layout, "p/00002", [_row("dddd", [_box(0, 1, 1, 2, 2, 0.99)], "p/00002")], finished=False)
    return layout


def test_coco_export_loads_in_pycocotools_with_continuous_xywh(layout, tmp_path):
    out = str(tmp_path / "coco.json")
    counts = export_coco(layout, TEACHER, out)
    assert counts == {"images": 3, "annotations": 3}, "the unfinished shard is not exported"
    coco = COCO(out)
    assert sorted(img["uid"] for img in coco.dataset["images"]) == ["aaaa", "bbbb", "cccc"]
    [first] = coco.loadAnns(coco.getAnnIds(imgIds=[1], catIds=[1]))[:1]
    assert first["bbox"] == pytest.approx([10.5, 20.25, 50.0, 50.0])  # w = x1 - x0, no "+1"
    assert first["area"] == pytest.approx(2500.0)
    assert first["tokens_positive"] == [[0, 16]] and first["phrase"] == "Two purple stars"
    assert first["category_id"] == 1 and first["iscrowd"] == 0 and first["score"] == pytest.approx(0.9)
    image = coco.loadImgs([1])[0]
    assert image["caption"] == CAPTION and image["file_name"] == "aaaa.jpg"
    assert (image["width"], image["height"]) == (300, 200)
    assert len(coco.getAnnIds(imgIds=[2])) == 0 and len(coco.getAnnIds(imgIds=[3])) == 1


def test_odvg_export_uses_mmdetection_field_names(layout):
    out = f"memory://exports-{uuid.uuid4().hex}/labels.jsonl"
    assert export_odvg(layout, TEACHER, out) == 3
    fs, path = storage.filesystem(out)
    records = [json.loads(line) for line in fs.cat_file(path).decode().splitlines()]
    assert [r["uid"] for r in records] == ["aaaa", "bbbb", "cccc"]
    first = records[0]
    assert {"filename", "height", "width", "grounding"} <= set(first)
    assert first["filename"] == "aaaa.jpg" and (first["width"], first["height"]) == (300, 200)
    assert first["grounding"]["caption"] == CAPTION
    assert first["grounding"]["regions"][0] == {
        "bbox": [10.5, 20.25, 60.5, 70.25],
        "phrase": "Two purple stars",
        "tokens_positive": [[0, 16]],
        "score": 0.9,
    }
    assert first["grounding"]["regions"][1]["phrase"] == "a red cross"
    assert records[1]["grounding"]["regions"] == []
    assert first["teacher"] == TEACHER and "round" not in first and first["source_shard"] == "p/00000"


def test_reading_labels_checks_the_schema(layout):
    assert read_labels(layout, TEACHER).num_rows == 3
    picked = read_labels(layout, TEACHER, uids={"cccc", "aaaa", "not labelled"})  # a sample's rows, in order
    assert picked["uid"].to_pylist() == ["aaaa", "cccc"]
    assert read_labels(layout, TEACHER, uids=()).num_rows == 0
    with storage.atomic_writer(layout.fs, layout.label_shard(TEACHER, "p/00001", ".parquet")) as handle:
        pq.write_table(pa.table({"uid": ["x"]}), handle)
    with pytest.raises(SchemaError, match="missing column 'boxes'") as error:
        read_labels(layout, TEACHER)
    path = layout.label_shard(TEACHER, "p/00001", ".parquet")
    assert error.value.where == path and str(error.value).startswith(f"{path} does not match the schema")
    newer = LABEL_SCHEMA.empty_table().replace_schema_metadata(
        {b"glip_engine.schema": b"label", b"glip_engine.schema_version": b"99"}
    )
    storage.write_parquet(layout.fs, path, newer)
    with pytest.raises(SchemaError, match=r"00001\.parquet does not match.*schema_version is b'99'"):
        read_labels(layout, TEACHER)


# ------------------------------------------------------------------------------------------------- quality

TRUTH = {
    "box_format": "xyxy",
    "samples": {
        "aaaa": {
            "caption": CAPTION,
            "boxes": [
                {"bbox": [10, 10, 50, 50], "category": "purple star"},
                {"bbox": [100, 100, 140, 140], "category": "purple star"},
                {"bbox": [200, 20, 240, 60], "category": "red cross"},
                {"bbox": [250, 150, 290, 190], "category": "blue circle"},  # not mentioned
            ],
            "mentions": [
                {"start": 4, "end": 16, "category": "purple star", "boxes": [0, 1]},
                {"start": 23, "end": 32, "category": "red cross", "boxes": [2]},
            ],
        },
    },
}


def test_quality_counts_hand_checked():
    boxes = [
        _box(0, 11, 11, 51, 51, 0.9),  # TP: purple star 0 (IoU 39*39/(2*1600-1521) = 0.906)
        _box(0, 12, 12, 52, 52, 0.8),  # duplicate of star 0, already matched: FP
        _box(1, 100, 100, 140, 140, 0.7),  # right place of star 1 but phrase "a red cross": FP
        _box(1, 200, 20, 230, 60, 0.6),  # red cross, IoU 30*40/1600 = 0.75: TP
        _box(0, 250, 150, 290, 190, 0.55),  # the blue circle, grounded as "purple stars": FP
    ]
    labels = pa.Table.from_pylist(
        [_row("aaaa", boxes), _row("zzzz", [_box(0, 0, 0, 5, 5, 0.9)])], schema=LABEL_SCHEMA
    )
    report = quality(labels, TRUTH)
    assert (report.images, report.images_without_truth, report.boxes) == (1, 1, 5)
    assert quality((labels.slice(i, 1) for i in range(2)), TRUTH) == report  # tables one at a time (shards)
    assert (report.true_positives, report.unnamed_boxes) == (2, 0)
    assert (report.mentioned_truth, report.mentioned_found) == (3, 2)
    assert report.precision == pytest.approx(2 / 5) and report.recall == pytest.approx(2 / 3)
    strict = quality(labels, TRUTH["samples"], min_score=0.65)
    assert (strict.boxes, strict.true_positives, strict.precision) == (3, 1, pytest.approx(1 / 3))
    loose = quality(labels, TRUTH, iou_threshold=0.95)
    assert loose.true_positives == 0 and loose.recall == 0.0
    empty = quality(LABEL_SCHEMA.empty_table(), TRUTH)
    assert empty.precision is None and empty.recall is None
    assert report.to_dict()["precision"] == pytest.approx(0.4)


def test_phrase_names_come_from_mentions_then_words():
    mentions = TRUTH["samples"]["aaaa"]["mentions"]
    categories = ["purple star", "red cross", "blue circle"]
    assert (
        phrase_category({"text": "Two purple stars", "start": 0, "end": 16}, mentions, categories)
        == "purple star"
    )
    assert (
        phrase_category({"text": "blue circles", "start": 40, "end": 52}, mentions, categories)
        == "blue circle"
    )
    assert phrase_category({"text": "red crosses", "start": 40, "end": 51}, [], categories) == "red cross"
    assert (
        phrase_category({"text": "free HD wallpaper", "start": 34, "end": 51}, mentions, categories) is None
    )


def test_the_keep_threshold_is_applied_where_labels_are_read(layout, tmp_path):
    everything = read_labels(layout, TEACHER)
    scores = [b["score"] for row in everything.to_pylist() for b in row["boxes"]]
    threshold = sorted(scores)[len(scores) // 2]
    kept = read_labels(layout, TEACHER, threshold)
    assert kept.num_rows == everything.num_rows and kept.schema.equals(everything.schema, check_metadata=True)
    for before, after in zip(everything.to_pylist(), kept.to_pylist()):
        assert after["boxes"] == [b for b in before["boxes"] if b["score"] > threshold]  # strict, order kept
        assert after["phrases"] == before["phrases"]
    counts = export_coco(layout, TEACHER, str(tmp_path / "kept.json"), threshold)
    assert counts["annotations"] == sum(s > threshold for s in scores) < len(scores)
    assert json.loads((tmp_path / "kept.json").read_text())["info"]["threshold"] == threshold


def test_the_phrase_best_rule_keeps_each_phrases_top_box_of_its_row(layout, tmp_path):
    everything = read_labels(layout, TEACHER)
    rule = Keep(0.6, phrase_best=0.2)
    kept = read_labels(layout, TEACHER, rule)
    assert kept.num_rows == everything.num_rows
    for before, after in zip(everything.to_pylist(), kept.to_pylist()):
        best = {}
        for box in before["boxes"]:
            best[box["phrase"]] = max(best.get(box["phrase"], 0.0), box["score"])
        expected = [b for b in before["boxes"] if b["score"] > 0.6 or (b["score"] == best[b["phrase"]] > 0.2)]
        assert after["boxes"] == expected  # order kept
    assert sum(map(len, kept["boxes"].to_pylist())) > sum(
        map(len, read_labels(layout, TEACHER, 0.6)["boxes"].to_pylist())
    )
    counts = export_coco(layout, TEACHER, str(tmp_path / "rule.json"), rule)
    assert counts["annotations"] == sum(map(len, kept["boxes"].to_pylist()))
