"""The label stage: one image shard end to end (local and memory://), determinism, crash safety, bad input,
filters, schema validation."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from glip import checkpoint
from glip.config import from_reference_config
from pipeline import storage
from pipeline.label import (
    LabelConfig,
    LabelShard,
    above_threshold,
    filter_boxes,
    in_background,
    label_shards_inprocess,
    large_enough,
    pending_label_shards,
    prepare_job,
    suppress,
    top_k,
)
from pipeline.ledger import Ledger
from pipeline.schema import ERROR_SCHEMA, LABEL_SCHEMA, SchemaError, validate
from teacher import PhraseBox, Teacher, TeacherConfig
from tests.conftest import reference_dir

SHARD = "part-00000/00000"
CAPTIONS = [
    ("a red circle next to a blue square", ["a red circle", "a blue square"]),
    ("Stock photo of a green triangle", ["a green triangle"]),
    ("two blue squares and a red circle, free HD wallpaper", ["two blue squares", "a red circle"]),
    ("a red circle", ["a red circle"]),
]
FAST = LabelConfig(score_threshold=0.3, max_boxes_per_image=4, batch_size=2, prefetch_images=2)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Teacher:
    """The reference tiny GLIP (perturbed weights: it finds boxes) saved in our format, small inputs."""
    config = from_reference_config(json.loads((reference_dir() / "tiny" / "config.json").read_text()))
    model = checkpoint.import_official(reference_dir() / "tiny" / "state_dict.safetensors", config)
    folder = checkpoint.save(model, config, tmp_path_factory.mktemp("teacher") / "ref-tiny")
    return Teacher.from_checkpoint(
        TeacherConfig(
            checkpoint=str(folder),
            device="cpu",
            batch_size=4,
            overrides=("input.min_size=96", "input.max_size=160", "text.pad_to_max=False"),
        )
    )


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.fromarray(rng.integers(40, 220, (height, width, 3), dtype=np.uint8))
    ImageDraw.Draw(image).ellipse((5, 5, width // 2, height // 2), fill=(230, 20, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _spans(caption: str, phrases: list[str]) -> list[dict]:
    return [{"text": p, "start": caption.index(p), "end": caption.index(p) + len(p)} for p in phrases]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _uid(key: str) -> str:
    return hashlib.sha256(f"http://example.test/{key}.jpg".encode()).hexdigest()[:16]


def make_shard(
    root: str, samples: list[dict], shard: str = SHARD, extra_members=(), phrase_rows=None
) -> None:
    """An ingested + phrased image shard in the img2dataset / phrase-stage layout, with ledger entries.

    ``samples``: dicts with key, caption, phrases (texts) and optional jpeg (None: not in the tar),
    status (default success)."""
    fs, root_path = storage.filesystem(root)
    partition, number = shard.split("/")
    members, rows = list(extra_members), []
    for s in samples:
        url, uid = f"http://example.test/{s['key']}.jpg", _uid(s["key"])
        data = s.get("jpeg")
        status = s.get("status", "success")
        if data is not None and status == "success":
            members += [
                (f"{s['key']}.jpg", data),
                (f"{s['key']}.txt", s["caption"].encode()),
                (f"{s['key']}.json", json.dumps({"uid": uid}).encode()),
            ]
        rows.append(
            {
                "key": s["key"],
                "uid": uid,
                "url": url,
                "caption": s["caption"],
                "status": status,
                "error_message": None,
                "width": 0,
                "height": 0,
                "original_width": 0,
                "original_height": 0,
                "sha256": hashlib.sha256(data or b"").hexdigest(),
            }
        )
        s["uid"] = uid
    folder = storage.join(root_path, "images", partition)
    storage.write_bytes(fs, storage.join(folder, f"{number}.tar"), _tar(sorted(members)))
    _parquet(fs, storage.join(folder, f"{number}.parquet"), pa.Table.from_pylist(rows))
    if phrase_rows is None:
        phrase_rows = [
            {"uid": s["uid"], "caption": s["caption"], "phrases": _spans(s["caption"], s["phrases"])}
            for s in samples
            if s.get("status", "success") == "success"
        ]
    phrase_type = pa.list_(pa.struct([("text", pa.string()), ("start", pa.int32()), ("end", pa.int32())]))
    phrases = pa.table(
        {
            "uid": [r["uid"] for r in phrase_rows],
            "caption": [r["caption"] for r in phrase_rows],
            "phrases": pa.array([r["phrases"] for r in phrase_rows], phrase_type),
        }
    )
    _parquet(fs, storage.join(root_path, "phrases", f"{shard}.parquet"), phrases)
    Ledger(root, "ingest").record(partition, {"shards": 1})
    Ledger(root, "phrases").record(shard, {"rows": len(phrase_rows)})


def _parquet(fs, path: str, table: pa.Table) -> None:
    with storage.atomic_writer(fs, path) as handle:
        pq.write_table(table, handle)


def _samples(count: int = 5) -> list[dict]:
    sizes = [(120, 90), (80, 140), (150, 100), (100, 100), (96, 64)]
    return [
        {
            "key": f"{i:09d}",
            "caption": CAPTIONS[i % len(CAPTIONS)][0],
            "phrases": CAPTIONS[i % len(CAPTIONS)][1],
            "jpeg": _jpeg(i, sizes[i % len(sizes)]),
        }
        for i in range(count)
    ]


def _outputs(root: str, name: str, shard: str = SHARD) -> dict[str, bytes]:
    fs, root_path = storage.filesystem(root)
    base = storage.join(root_path, "labels", name, shard)
    return {suffix: fs.cat_file(f"{base}{suffix}") for suffix in (".parquet", ".tar", ".errors.parquet")}


def _members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


# ---------------------------------------------------------------------------------------------- the stage


def test_label_shard_end_to_end(teacher, tmp_path):
    root = str(tmp_path / "root")
    samples = _samples()
    make_shard(root, samples)
    stage = LabelShard(teacher, FAST)
    assert pending_label_shards(root, stage.name) == [SHARD]
    [entry] = label_shards_inprocess(root, pending_label_shards(root, stage.name), stage)
    assert pending_label_shards(root, stage.name) == []

    files = _outputs(root, teacher.teacher_id)
    table = pq.read_table(io.BytesIO(files[".parquet"]))
    validate(table)
    rows = table.to_pylist()
    assert [r["uid"] for r in rows] == sorted(s["uid"] for s in samples)
    by_uid = {s["uid"]: s for s in samples}
    for row in rows:
        sample = by_uid[row["uid"]]
        assert (row["width"], row["height"]) == Image.open(io.BytesIO(sample["jpeg"])).size
        assert row["caption"] == sample["caption"] and row["source_shard"] == SHARD
        assert [p["text"] for p in row["phrases"]] == sample["phrases"]
        assert len(row["boxes"]) <= FAST.max_boxes_per_image
        for box in row["boxes"]:
            assert 0 <= box["phrase"] < len(row["phrases"]) and box["score"] > FAST.score_threshold
            assert 0 <= box["x0"] < box["x1"] <= row["width"] and 0 <= box["y0"] < box["y1"] <= row["height"]
        assert row["teacher"] == teacher.teacher_id and row["config_hash"] == stage.config_hash
    assert sum(len(r["boxes"]) for r in rows) == entry["boxes"] > 0
    assert entry["images"] == entry["images_written"] == 5 and entry["errors"] == 0
    assert entry["images_without_boxes"] == sum(1 for r in rows if not r["boxes"])

    members = _members(files[".tar"])
    names = [m.name for m, _ in members]
    assert (
        names
        == sorted(names)
        == sorted([f"{s['uid']}.jpg" for s in samples] + [f"{s['uid']}.json" for s in samples])
    )
    contents = dict((m.name, data) for m, data in members)
    for s in samples:
        assert contents[f"{s['uid']}.jpg"] == s["jpeg"], "original bytes, not re-encoded"
        record = json.loads(contents[f"{s['uid']}.json"])
        assert record["filename"] == f"{s['uid']}.jpg" and record["grounding"]["caption"] == s["caption"]
        assert set(record["grounding"]) == {"caption", "regions"}
        for region in record["grounding"]["regions"]:
            assert set(region) == {"bbox", "phrase", "tokens_positive", "score"}
            [[start, end]] = region["tokens_positive"]
            assert s["caption"][start:end] == region["phrase"]
        assert record["uid"] == s["uid"] and record["teacher"] == teacher.teacher_id
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m, _ in members} == {
        (members[0][0].mtime, 0, 0, "", 0o644)
    }
    assert pq.read_table(io.BytesIO(files[".errors.parquet"])).num_rows == 0
    assert Ledger(root, stage.stage).get(SHARD)["config_hash"] == stage.config_hash


def test_memory_root_gives_the_same_bytes_as_a_local_root(teacher, tmp_path):
    stage = LabelShard(teacher, FAST)
    roots = [str(tmp_path / "local"), f"memory://label-test-{uuid.uuid4().hex}"]
    for root in roots:
        make_shard(root, _samples(3))
        fs, root_path = storage.filesystem(root)
        # One labeling job, two roots: the same job file makes created_at the same.
        storage.write_json(
            fs,
            storage.join(root_path, "labels", stage.name, "_job.json"),
            {
                "created_at": "2025-01-02T03:04:05+00:00",
                "teacher": teacher.teacher_id,
                "config_hash": stage.config_hash,
                "schema_version": 1,
            },
        )
        stage(root, SHARD)
    local, memory = (_outputs(root, stage.name) for root in roots)
    assert local == memory
    assert (
        pq.read_table(io.BytesIO(memory[".parquet"])).column("created_at")[0].as_py()
        == "2025-01-02T03:04:05+00:00"
    )
    assert Ledger(roots[1], stage.stage).is_done(SHARD)


def test_rerun_and_crash_before_the_ledger_rewrite_identical_files(teacher, tmp_path):
    root = str(tmp_path / "root")
    make_shard(root, _samples(3))
    stage = LabelShard(teacher, FAST)
    stage(root, SHARD)
    first = _outputs(root, stage.name)
    fs, root_path = storage.filesystem(root)
    ledger_path = storage.join(root_path, "ledger", stage.stage, f"{SHARD}.json")

    # crash after the label parquet and tar, before the errors file and the ledger entry
    fs.rm(ledger_path)
    errors_path = storage.join(root_path, "labels", stage.name, f"{SHARD}.errors.parquet")
    fs.rm(errors_path)
    fs.makedirs(errors_path)  # a directory in the way makes the last output fail
    with pytest.raises(OSError):
        stage(root, SHARD)
    assert not fs.exists(ledger_path), "no ledger entry unless every output is written"
    assert pending_label_shards(root, stage.name) == [SHARD]
    fs.rm(errors_path, recursive=True)
    label_shards_inprocess(root, pending_label_shards(root, stage.name), stage)
    assert _outputs(root, stage.name) == first
    assert fs.exists(ledger_path)


def test_bad_input_becomes_error_rows_and_nothing_else_is_lost(teacher, tmp_path):
    root = str(tmp_path / "root")
    samples = _samples(5)
    samples[1]["jpeg"] = samples[1]["jpeg"][: len(samples[1]["jpeg"]) // 2]  # truncated JPEG
    samples[2]["jpeg"] = None  # ingested row whose image is not in the tar
    samples.append(
        {
            "key": "000000099",
            "caption": "a red circle",
            "phrases": ["a red circle"],
            "jpeg": _jpeg(9, (64, 64)),
            "status": "failed_to_download",
        }
    )
    extra = [("000000777.jpg", _jpeg(7, (64, 64)))]  # tar image without an ingest row
    phrase_rows = [
        {"uid": _uid(s["key"]), "caption": s["caption"], "phrases": _spans(s["caption"], s["phrases"])}
        for s in samples[:4]
    ]
    phrase_rows[0]["phrases"] = []  # a caption without phrases: labelled with no boxes, no model run
    phrase_rows[3]["phrases"] = [{"text": "beyond", "start": 3, "end": 400}]  # a span past the caption
    make_shard(root, samples, extra_members=extra, phrase_rows=phrase_rows)  # samples[4]: no phrase row

    entry = LabelShard(teacher, FAST)(root, SHARD)
    files = _outputs(root, teacher.teacher_id)
    errors = pq.read_table(io.BytesIO(files[".errors.parquet"]))
    validate(errors, ERROR_SCHEMA)
    reasons = {(r["uid"], r["reason"]) for r in errors.to_pylist()}
    assert reasons == {
        (samples[1]["uid"], "undecodable_image"),
        (samples[2]["uid"], "missing_image"),
        (None, "unknown_tar_member"),
        (samples[3]["uid"], "bad_prompt"),
        (samples[4]["uid"], "missing_phrases"),
    }
    rows = pq.read_table(io.BytesIO(files[".parquet"])).to_pylist()
    assert [r["uid"] for r in rows] == [samples[0]["uid"]] and rows[0]["boxes"] == []
    assert entry["errors"] == 5 and entry["images"] == 1 and entry["images_without_phrases"] == 1
    assert entry["error_reasons"]["undecodable_image"] == 1


def test_corrupt_tar_keeps_what_was_read(teacher, tmp_path):
    root = str(tmp_path / "root")
    samples = _samples(3)
    make_shard(root, samples)
    fs, root_path = storage.filesystem(root)
    tar_path = storage.join(root_path, "images", f"{SHARD}.tar")
    data = fs.cat_file(tar_path)
    fs.pipe_file(tar_path, data[: len(data) // 2])
    entry = LabelShard(teacher, FAST)(root, SHARD)
    reasons = pq.read_table(io.BytesIO(_outputs(root, teacher.teacher_id)[".errors.parquet"])).column(
        "reason"
    )
    assert "tar_read_error" in reasons.to_pylist() and "missing_image" in reasons.to_pylist()
    assert entry["images"] >= 1 and entry["images"] + reasons.to_pylist().count("missing_image") == 3


def test_label_only_tars_and_dropping_images_without_boxes(teacher, tmp_path):
    root = str(tmp_path / "root")
    samples = _samples(3)
    make_shard(root, samples)
    config = LabelConfig(
        score_threshold=0.999, label_only_tars=True, drop_images_without_boxes=True, teacher="strict"
    )
    stage = LabelShard(teacher, config)
    entry = stage(root, SHARD)
    files = _outputs(root, "strict")
    assert entry["images"] == 3 and entry["images_without_boxes"] == 3 and entry["images_written"] == 0
    assert pq.read_table(io.BytesIO(files[".parquet"])).num_rows == 0
    assert _members(files[".tar"]) == []
    kept = LabelShard(teacher, LabelConfig(score_threshold=0.3, label_only_tars=True, teacher="kept"))
    kept(root, SHARD)
    names = [m.name for m, _ in _members(_outputs(root, "kept")[".tar"])]
    assert names == sorted(f"{s['uid']}.json" for s in samples)


def test_job_file_guards_the_output_folder(teacher, tmp_path):
    root = str(tmp_path / "root")
    stage = LabelShard(teacher, FAST)
    driver = prepare_job(root, stage.name)  # the driver stamps the time before any worker starts
    assert set(driver) == {"created_at", "schema_version"}
    job = stage.prepare(root)  # a worker adds its teacher and config
    assert job == {**driver, "teacher": teacher.teacher_id, "config_hash": stage.config_hash}
    assert stage.prepare(root) == job == prepare_job(root, stage.name)
    same = LabelConfig(score_threshold=0.3, max_boxes_per_image=4, batch_size=2, prefetch_images=8)
    assert LabelShard(teacher, same).config_hash == stage.config_hash  # prefetching changes no output
    with pytest.raises(ValueError, match="another folder"):
        prepare_job(root, stage.name, teacher.teacher_id, "0" * 16)
    with pytest.raises(ValueError, match="another folder"):
        LabelShard(teacher, LabelConfig(score_threshold=0.4, teacher=stage.name)).prepare(root)


# ------------------------------------------------------------------------------------------------ filters


def _box(phrase: int, box, score: float) -> PhraseBox:
    return PhraseBox(phrase, tuple(float(v) for v in box), score)


def test_threshold_is_strict_and_min_size_drops_small_and_empty_boxes():
    boxes = [_box(0, (0, 0, 10, 10), 0.5), _box(0, (0, 0, 10, 10), 0.51), _box(1, (5, 5, 5, 9), 0.9)]
    assert above_threshold(boxes, 0.5) == boxes[1:]
    assert large_enough(boxes, 0.0) == boxes[:2], "a zero-width box never survives"
    assert large_enough([_box(0, (0, 0, 4, 10), 0.9), _box(0, (0, 0, 6, 6), 0.8)], 5) == [
        _box(0, (0, 0, 6, 6), 0.8)
    ]


def test_per_phrase_nms_keeps_overlaps_of_different_phrases_global_does_not():
    a = _box(0, (0, 0, 10, 10), 0.9)
    a_overlap = _box(0, (1, 0, 11, 10), 0.8)  # IoU 9/11 with a
    b_overlap = _box(1, (0, 1, 10, 11), 0.7)  # other phrase, IoU 9/11 with a
    far = _box(1, (50, 50, 60, 60), 0.6)
    boxes = [far, b_overlap, a_overlap, a]
    assert suppress(boxes, "per_phrase", 0.5) == [a, b_overlap, far]
    assert suppress(boxes, "global", 0.5) == [a, far]
    assert suppress(boxes, "none", 0.5) == [a, a_overlap, b_overlap, far]
    assert suppress(boxes, "per_phrase", 0.9) == [a, a_overlap, b_overlap, far]  # 0.818 < 0.9


def test_cap_and_the_whole_filter_chain():
    boxes = [_box(i % 2, (10 * i, 0, 10 * i + 8, 8), 0.95 - 0.1 * i) for i in range(6)]
    assert top_k(boxes, 2) == boxes[:2]
    config = LabelConfig(score_threshold=0.5, nms="global", min_box_size=8, max_boxes_per_image=3)
    assert filter_boxes(boxes, config) == boxes[:3]
    assert filter_boxes(boxes, LabelConfig(score_threshold=0.5, min_box_size=9)) == []
    assert filter_boxes([], LabelConfig()) == [] and suppress([], "global", 0.5) == [] and top_k([], 3) == []


def test_label_config_checks():
    with pytest.raises(ValueError, match="nms"):
        LabelConfig(nms="class_agnostic")
    with pytest.raises(ValueError, match="batch_size"):
        LabelConfig(batch_size=0)
    with pytest.raises(ValueError, match="teacher"):
        LabelConfig(teacher="../x")


def test_background_iteration_keeps_order_and_reraises():
    assert list(in_background(iter(range(50)), maxsize=3)) == list(range(50))

    def broken():
        yield 1
        raise RuntimeError("decoder died")

    with pytest.raises(RuntimeError, match="decoder died"):
        list(in_background(broken(), maxsize=1))
    stream = in_background(iter(range(1000)), maxsize=2)
    assert next(stream) == 0
    stream.close()  # stops the producer thread (close joins it)


# ------------------------------------------------------------------------------------------------- schema


def _label_row(**changes) -> dict:
    row = {
        "uid": "u1",
        "url": "http://x/1.jpg",
        "sha256": "ab",
        "source_shard": SHARD,
        "width": 10,
        "height": 8,
        "caption": "a cat",
        "phrases": [{"text": "a cat", "start": 0, "end": 5}],
        "boxes": [{"phrase": 0, "x0": 1.0, "y0": 1.0, "x1": 5.0, "y1": 6.0, "score": 0.7}],
        "teacher": "t-0",
        "round": 0,
        "config_hash": "c",
        "created_at": "2025-01-01T00:00:00+00:00",
    }
    row.update(changes)
    return row


def test_schema_validation_names_the_bad_columns():
    good = pa.Table.from_pylist([_label_row()], schema=LABEL_SCHEMA)
    validate(good)
    buffer = io.BytesIO()
    pq.write_table(good, buffer)
    validate(pq.read_table(io.BytesIO(buffer.getvalue())))  # the version survives a Parquet round trip

    wrong = good.drop_columns(["sha256"])
    wrong = wrong.set_column(wrong.column_names.index("width"), "width", pa.array([10.0])).append_column(
        "extra", pa.array([1])
    )
    with pytest.raises(SchemaError) as error:
        validate(wrong)
    text = str(error.value)
    assert "'sha256'" in text and "'width'" in text and "'extra'" in text
    assert len(error.value.problems) == 3

    nulls = good.set_column(0, pa.field("uid", pa.string()), pa.array([None], pa.string()))
    with pytest.raises(SchemaError, match="'uid' has 1 null"):
        validate(nulls)
    with pytest.raises(SchemaError, match="schema_version"):
        validate(
            good.replace_schema_metadata(
                {b"glip_engine.schema": b"label", b"glip_engine.schema_version": b"0"}
            )
        )
    with pytest.raises(SchemaError, match="glip_engine.schema"):
        validate(good, ERROR_SCHEMA)
