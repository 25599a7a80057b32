"""The label stage: one image shard end to end (local and memory://), determinism, crash safety, bad input,
filters, schema validation."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import tarfile
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from glip import checkpoint
from glip.config import from_reference_config
from pipeline import graph, storage
from pipeline.executor import UnitResult, run_units
from pipeline.label import (
    LabelConfig,
    LabelSettings,
    LabelShard,
    above_threshold,
    filter_boxes,
    in_background,
    in_key_order,
    label_stage,
    large_enough,
    prepare_job,
    suppress,
    top_k,
)
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.schema import (
    ERROR_SCHEMA,
    LABEL_SCHEMA,
    PHRASE_TABLE_SCHEMA,
    SchemaError,
    UnitOutput,
    url_uid,
    validate,
)
from teacher import PhraseBox, Teacher, TeacherConfig
from tests.conftest import reference_dir
from tests.test_images import header_only_png

SHARD = "part-00000/00000"
CAPTIONS = [
    ("a red circle next to a blue square", ["a red circle", "a blue square"]),
    ("Stock photo of a green triangle", ["a green triangle"]),
    ("two blue squares and a red circle, free HD wallpaper", ["two blue squares", "a red circle"]),
    ("a red circle", ["a red circle"]),
]
FAST = LabelConfig(floor_score=0.3, max_boxes_per_image=4, batch_size=2, prefetch_images=2)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def teacher_config(tmp_path_factory) -> TeacherConfig:
    """The reference tiny GLIP (perturbed weights: it finds boxes) saved in our format, small inputs."""
    config = from_reference_config(json.loads((reference_dir() / "tiny" / "config.json").read_text()))
    model = checkpoint.import_official(reference_dir() / "tiny" / "state_dict.safetensors", config)
    folder = checkpoint.save(model, config, tmp_path_factory.mktemp("teacher") / "ref-tiny")
    return TeacherConfig(
        checkpoint=str(folder),
        device="cpu",
        batch_size=4,
        overrides=("input.min_size=96", "input.max_size=160", "text.pad_to_max=False"),
    )


@pytest.fixture(scope="module")
def teacher(teacher_config) -> Teacher:
    return Teacher.from_checkpoint(teacher_config)


@pytest.fixture(scope="module")
def bucketed_teacher(teacher_config) -> Teacher:
    """The same teacher with sizes bucketed (as compiled or graphed teachers are): batches of one padded size."""
    return Teacher.from_checkpoint(dataclasses.replace(teacher_config, size_bucket=64))


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
    """A tar of exactly these member names (tarfile, not ``pipeline.tars``: tests need names it refuses)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _uid(key: str) -> str:
    return url_uid(f"http://example.test/{key}.jpg")


def make_shard(
    layout: Layout,
    samples: list[dict],
    shard: str = SHARD,
    extra_members=(),
    phrase_rows=None,
    in_given_order: bool = False,
) -> None:
    """An ingested + phrased image shard in the img2dataset / phrase-stage layout, with ledger entries.

    ``samples``: dicts with key, caption, phrases (texts) and optional jpeg (None: not in the tar),
    status (default success). Tar members are sorted by name unless ``in_given_order`` (as img2dataset
    writes them: as downloads finish)."""
    partition = shard.split("/")[0]
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
    members = members if in_given_order else sorted(members)
    storage.write_bytes(layout.fs, layout.image_shard(shard, ".tar"), _tar(members))
    storage.write_parquet(layout.fs, layout.image_shard(shard, ".parquet"), pa.Table.from_pylist(rows))
    if phrase_rows is None:
        phrase_rows = [
            {"uid": s["uid"], "caption": s["caption"], "phrases": _spans(s["caption"], s["phrases"])}
            for s in samples
            if s.get("status", "success") == "success"
        ]
    phrases = pa.Table.from_pylist(phrase_rows, schema=PHRASE_TABLE_SCHEMA)
    storage.write_parquet(layout.fs, layout.phrase_table(shard), phrases)
    Ledger(layout, "ingest").record(partition, {"shards": [shard]})
    Ledger(layout, "phrases").record(shard, {"rows": len(phrase_rows)})


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


def _label(layout: Layout, stage: LabelShard, **options) -> UnitResult:
    """Label ``SHARD`` through the executor, which commits the error table and the ledger entry."""
    stage_name = label_stage(stage.name)
    results = run_units(
        layout, [SHARD], lambda: stage, stage_name, in_process=True, prepare=True, progress=False, **options
    )
    return results[SHARD]


def _outputs(layout: Layout, name: str, shard: str = SHARD) -> dict[str, bytes]:
    """The committed files of one label shard: labels, tar and the executor's error table."""
    paths = {
        ".parquet": layout.label_shard(name, shard, ".parquet"),
        ".tar": layout.label_shard(name, shard, ".tar"),
        "errors": layout.errors(label_stage(name), shard),
    }
    return {key: layout.fs.cat_file(path) for key, path in paths.items()}


def _errors(files: dict[str, bytes]) -> pa.Table:
    errors = pq.read_table(io.BytesIO(files["errors"]))
    validate(errors, ERROR_SCHEMA)
    return errors


def _members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


# ---------------------------------------------------------------------------------------------- the stage


def test_label_stage_end_to_end(teacher, teacher_config, tmp_path):
    layout = Layout(str(tmp_path / "root"))
    samples = _samples()
    make_shard(layout, samples)
    settings = LabelSettings(teacher_config, FAST)
    stage = LabelShard(teacher, FAST)
    assert settings.folder == stage.name == teacher.teacher_id
    assert graph.pending(layout, "label", settings) == [SHARD]
    run = graph.run(layout, "label", settings, in_process=True, progress=False)  # the checkpoint on disk
    assert run.stage == stage.stage == f"label-{teacher.teacher_id}" and run.complete
    entry = run.results[SHARD].stats
    assert graph.pending(layout, "label", settings) == []

    files = _outputs(layout, teacher.teacher_id)
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
            assert 0 <= box["phrase"] < len(row["phrases"]) and box["score"] > FAST.floor_score
            assert 0 <= box["x0"] < box["x1"] <= row["width"] and 0 <= box["y0"] < box["y1"] <= row["height"]
        assert row["teacher"] == teacher.teacher_id and row["config_hash"] == stage.config_hash
    assert sum(len(r["boxes"]) for r in rows) == entry["boxes"] > 0
    assert entry["images"] == entry["images_written"] == 5 and entry["errors"] == 0
    assert entry["images_without_boxes"] == sum(1 for r in rows if not r["boxes"])

    members = _members(files[".tar"])
    names = [m.name for m, _ in members]
    assert names == [f"{s['uid']}.{suffix}" for s in samples for suffix in ("jpg", "json")], "in key order"
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
    created = int(dt.datetime.fromisoformat(entry["created_at"]).timestamp())
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m, _ in members} == {
        (created, 0, 0, "", "", 0o644)
    }, "fixed headers: the job's time, no owner"
    assert _errors(files).num_rows == 0
    assert Ledger(layout, stage.stage).get(SHARD) == entry and entry["config_hash"] == stage.config_hash


def test_memory_root_gives_the_same_bytes_as_a_local_root(teacher, tmp_path):
    stage = LabelShard(teacher, FAST)
    layouts = [Layout(str(tmp_path / "local")), Layout(f"memory://label-test-{uuid.uuid4().hex}")]
    for layout in layouts:
        make_shard(layout, _samples(3))
        # One labeling job, two roots: the same job file makes created_at the same.
        storage.write_json(
            layout.fs,
            layout.label_job(stage.name),
            {
                "created_at": "2025-01-02T03:04:05+00:00",
                "teacher": teacher.teacher_id,
                "config_hash": stage.config_hash,
                "schema_version": 1,
            },
        )
        assert _label(layout, stage).status == "done"
    local, memory = (_outputs(layout, stage.name) for layout in layouts)
    assert local == memory
    assert (
        pq.read_table(io.BytesIO(memory[".parquet"])).column("created_at")[0].as_py()
        == "2025-01-02T03:04:05+00:00"
    )
    assert Ledger(layouts[1], stage.stage).is_done(SHARD)
    layouts[1].fs.rm(layouts[1].root, recursive=True)


class _Pipelined:
    """The teacher as a GPU teacher is used: ``in_flight`` batches submitted before the oldest is collected
    (on CPU ``submit`` already ran the batch; what is tested is the stage's bookkeeping). Counts the most
    batches that were ever waiting, so a test can see that the stage did keep them in flight."""

    def __init__(self, teacher: Teacher, in_flight: int) -> None:
        self.teacher, self.in_flight = teacher, in_flight
        self.waiting = self.most_waiting = 0

    def __getattr__(self, name):
        return getattr(self.teacher, name)

    def submit(self, images, prompts):
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        return self.teacher.submit(images, prompts)

    def collect(self, pending):
        self.waiting -= 1
        return self.teacher.collect(pending)


@pytest.mark.parametrize(
    "decode, workers, in_flight", [("thread", 1, 1), ("thread", 3, 1), ("thread", 3, 2), ("inline", 1, 2)]
)
def test_decoding_and_batches_in_flight_give_the_bytes_of_inline_one_at_a_time(
    teacher, tmp_path, decode, workers, in_flight
):
    """``LabelConfig.decode`` (a thread, the default on accelerators, with a pool of ``decode_workers``, or
    inline, the default on CPU) and the teacher's ``in_flight`` batches (2 on GPUs) write the same files,
    errors included, as inline decoding with one batch at a time; none of them is part of the config hash."""
    samples = _samples(23)
    samples[4]["jpeg"] = samples[4]["jpeg"][: len(samples[4]["jpeg"]) // 2]  # an error row, in order
    config = dataclasses.replace(FAST, batch_size=3, decode=decode, decode_workers=workers)
    pipelined = _Pipelined(teacher, in_flight)
    stages = {"reference": LabelShard(teacher, dataclasses.replace(FAST, batch_size=3, decode="inline"))}
    stages["tried"] = LabelShard(pipelined, config)
    assert stages["reference"].config_hash == stages["tried"].config_hash
    outputs = {}
    for name, stage in stages.items():
        layout = Layout(str(tmp_path / name))
        make_shard(layout, samples)
        storage.write_json(layout.fs, layout.label_job(stage.name), {
            "created_at": "2025-01-02T03:04:05+00:00", "teacher": teacher.teacher_id,
            "config_hash": stage.config_hash, "schema_version": 1})  # fmt: skip
        assert _label(layout, stage).status == "done"
        outputs[name] = _outputs(layout, stage.name)
    assert outputs["tried"] == outputs["reference"]
    assert _errors(outputs["tried"]).column("reason").to_pylist() == ["undecodable_image"]
    assert pipelined.most_waiting == in_flight
    with pytest.raises(ValueError, match="decode"):
        LabelConfig(decode="gpu")
    with pytest.raises(ValueError, match="decode_workers"):
        LabelConfig(decode_workers=0)


def test_rerun_and_crash_before_the_ledger_rewrite_identical_files(teacher, tmp_path):
    layout = Layout(str(tmp_path / "root"))
    make_shard(layout, _samples(3))
    stage = LabelShard(teacher, FAST)
    _label(layout, stage)
    first = _outputs(layout, stage.name)
    ledger_path = layout.ledger_entry(stage.stage, SHARD)

    # crash after the label parquet and tar, before the error table and the ledger entry
    layout.fs.rm(ledger_path)
    errors_path = layout.errors(stage.stage, SHARD)
    layout.fs.rm(errors_path)
    layout.fs.makedirs(errors_path)  # a directory in the way makes the commit fail
    crashed = _label(layout, stage, max_attempts=1)
    assert crashed.status == "failed" and "Error" in crashed.error
    assert not layout.fs.exists(ledger_path), "no ledger entry unless every output is written"
    assert Ledger(layout, stage.stage).pending([SHARD]) == [SHARD]
    layout.fs.rm(errors_path, recursive=True)
    assert _label(layout, stage).status == "done"
    assert _outputs(layout, stage.name) == first
    assert layout.fs.exists(ledger_path)


def test_bad_input_becomes_error_rows_and_nothing_else_is_lost(teacher, tmp_path):
    layout = Layout(str(tmp_path / "root"))
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
    make_shard(layout, samples, extra_members=extra, phrase_rows=phrase_rows)  # samples[4]: no phrase row

    stage = LabelShard(teacher, FAST)
    expected = {
        (samples[1]["uid"], "undecodable_image"),
        (samples[2]["uid"], "missing_image"),
        (None, "unknown_tar_member"),
        (samples[3]["uid"], "bad_prompt"),
        (samples[4]["uid"], "missing_phrases"),
    }
    output = stage(layout, SHARD)  # the worker alone: its error rows are returned, not written
    assert isinstance(output, UnitOutput)
    assert {(e["uid"], e["reason"]) for e in output.errors} == expected and len(output.errors) == 5
    assert not layout.fs.exists(layout.errors(stage.stage, SHARD))

    entry = _label(layout, stage).stats
    files = _outputs(layout, teacher.teacher_id)
    errors = _errors(files)
    assert {(r["uid"], r["reason"]) for r in errors.to_pylist()} == expected and errors.num_rows == 5
    assert set(errors.column("stage").to_pylist()) == {stage.stage}
    [unknown] = [r for r in errors.to_pylist() if r["reason"] == "unknown_tar_member"]
    assert "000000777" in unknown["detail"]
    rows = pq.read_table(io.BytesIO(files[".parquet"])).to_pylist()
    assert [r["uid"] for r in rows] == [samples[0]["uid"]] and rows[0]["boxes"] == []
    assert entry["errors"] == 5 and entry["images"] == 1 and entry["images_without_phrases"] == 1
    assert entry["error_reasons"]["undecodable_image"] == 1


def test_corrupt_tar_keeps_what_was_read(teacher, tmp_path):
    layout = Layout(str(tmp_path / "root"))
    make_shard(layout, _samples(3))
    tar_path = layout.image_shard(SHARD, ".tar")
    data = layout.fs.cat_file(tar_path)
    layout.fs.pipe_file(tar_path, data[: len(data) // 2])
    entry = _label(layout, LabelShard(teacher, FAST)).stats
    reasons = _errors(_outputs(layout, teacher.teacher_id)).column("reason").to_pylist()
    assert "tar_read_error" in reasons and "missing_image" in reasons
    assert entry["images"] >= 1 and entry["images"] + reasons.count("missing_image") == 3


def test_unsafe_member_names_become_error_rows_and_nothing_is_written_outside_the_root(teacher, tmp_path):
    layout = Layout(str(tmp_path / "root"))
    samples = _samples(2)
    unsafe = [("../x.jpg", _jpeg(7, (64, 64))), ("/abs.jpg", _jpeg(8, (64, 64)))]
    make_shard(layout, samples, extra_members=unsafe)
    result = _label(layout, LabelShard(teacher, FAST))
    assert result.status == "done"
    files = _outputs(layout, teacher.teacher_id)
    errors = _errors(files).to_pylist()
    assert sorted((e["uid"], e["reason"]) for e in errors) == [(None, "unsafe_member_name")] * 2
    assert sorted(e["detail"] for e in errors) == sorted(repr(name) for name, _ in unsafe)
    assert result.stats["errors"] == 2 and result.stats["images"] == 2
    rows = pq.read_table(io.BytesIO(files[".parquet"])).to_pylist()
    assert [r["uid"] for r in rows] == sorted(s["uid"] for s in samples), "the safe samples are labelled"
    names = [m.name for m, _ in _members(files[".tar"])]
    assert names == [f"{s['uid']}.{suffix}" for s in samples for suffix in ("jpg", "json")]
    assert [p.name for p in tmp_path.iterdir()] == ["root"] and not list(tmp_path.rglob("x.jpg"))
    assert not list(tmp_path.rglob("abs.jpg")) and not Path("/abs.jpg").exists()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_and_link_members_become_error_rows(teacher, tmp_path):
    layout = Layout(str(tmp_path / "root"))
    samples = _samples(3)
    samples[1]["jpeg"] = header_only_png(10_000, 10_000)  # 100 MP: PIL alone would only warn and decode
    make_shard(layout, samples)
    tar_path = layout.image_shard(SHARD, ".tar")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for member, data in _members(layout.fs.cat_file(tar_path)):
            archive.addfile(member, io.BytesIO(data))
        for name, kind in (("000000888.jpg", tarfile.SYMTYPE), ("000000889.jpg", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            archive.addfile(info)
    layout.fs.pipe_file(tar_path, buffer.getvalue())
    result = _label(layout, LabelShard(teacher, FAST))
    assert result.status == "done"
    errors = _errors(_outputs(layout, teacher.teacher_id)).to_pylist()
    assert sorted((e["uid"] or "", e["reason"]) for e in errors) == sorted(
        [(samples[1]["uid"], "image_too_large"), ("", "non_regular_member"), ("", "non_regular_member")]
    )
    assert "10000x10000" in next(e["detail"] for e in errors if e["reason"] == "image_too_large")
    rows = pq.read_table(io.BytesIO(_outputs(layout, teacher.teacher_id)[".parquet"])).to_pylist()
    assert [r["uid"] for r in rows] == sorted([samples[0]["uid"], samples[2]["uid"]]), "the others are kept"
    assert result.stats["error_reasons"] == {"image_too_large": 1, "non_regular_member": 2}


def test_a_phrase_table_of_another_schema_version_fails_the_unit_naming_the_file(teacher, tmp_path):
    layout = Layout(str(tmp_path / "root"))
    make_shard(layout, _samples(2))
    path = layout.phrase_table(SHARD)
    table = storage.read_parquet(layout.fs, path)
    newer = {b"glip_engine.schema": b"phrases", b"glip_engine.schema_version": b"2"}
    storage.write_parquet(layout.fs, path, table.replace_schema_metadata(newer))
    result = _label(layout, LabelShard(teacher, FAST), max_attempts=1)
    assert result.status == "failed" and "SchemaError" in result.error
    assert f"{path} does not match the schema" in result.error and "schema_version is b'2'" in result.error
    assert not Ledger(layout, label_stage(teacher.teacher_id)).is_done(SHARD)


def test_label_only_tars_and_dropping_images_without_boxes(teacher, tmp_path):
    layout = Layout(str(tmp_path / "root"))
    samples = _samples(3)
    make_shard(layout, samples)
    config = LabelConfig(
        floor_score=0.999, label_only_tars=True, drop_images_without_boxes=True, teacher="strict"
    )
    stats = LabelShard(teacher, config)(layout, SHARD).stats
    parquet, tar = (layout.label_shard("strict", SHARD, suffix) for suffix in (".parquet", ".tar"))
    assert stats["images"] == 3 and stats["images_without_boxes"] == 3 and stats["images_written"] == 0
    assert stats["label_only_tars"] is True
    assert storage.read_parquet(layout.fs, parquet).num_rows == 0
    assert _members(layout.fs.cat_file(tar)) == []
    kept = LabelShard(teacher, LabelConfig(floor_score=0.3, label_only_tars=True, teacher="kept"))
    kept(layout, SHARD)
    names = [m.name for m, _ in _members(layout.fs.cat_file(layout.label_shard("kept", SHARD, ".tar")))]
    assert names == [f"{s['uid']}.json" for s in samples]


def test_job_file_guards_the_output_folder(teacher, tmp_path):
    layout = Layout(str(tmp_path / "root"))
    stage = LabelShard(teacher, FAST)
    driver = prepare_job(layout, stage.name)  # the driver stamps the time before any worker starts
    assert set(driver) == {"created_at", "schema_version"}
    assert storage.read_json(layout.fs, layout.label_job(stage.name)) == driver
    job = stage.prepare(layout)  # a worker adds its teacher and config
    assert job == {**driver, "teacher": teacher.teacher_id, "config_hash": stage.config_hash}
    assert stage.prepare(layout) == job == prepare_job(layout, stage.name)
    same = LabelConfig(floor_score=0.3, max_boxes_per_image=4, batch_size=2, prefetch_images=8)
    assert LabelShard(teacher, same).config_hash == stage.config_hash  # prefetching changes no output
    with pytest.raises(ValueError, match="another folder"):
        prepare_job(layout, stage.name, teacher.teacher_id, "0" * 16)
    with pytest.raises(ValueError, match="another folder"):
        LabelShard(teacher, LabelConfig(floor_score=0.4, teacher=stage.name)).prepare(layout)


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
    config = LabelConfig(floor_score=0.5, nms="global", min_box_size=8, max_boxes_per_image=3)
    assert filter_boxes(boxes, config) == boxes[:3]
    assert filter_boxes(boxes, LabelConfig(floor_score=0.5, min_box_size=9)) == []
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


@pytest.mark.parametrize("which", ["teacher", "bucketed_teacher"])
def test_streamed_forward_batches_give_the_boxes_of_label_prompts(which, request, tmp_path):
    """The stage runs (image, prompt) pairs as soon as a forward batch of them is waiting; the boxes must be
    those of ``Teacher.label_prompts`` on each group of images. Without buckets a group's last batch goes at
    the group's end (same batches, same padding as ``label_prompts``); with a size bucket, pairs of one padded
    size wait across groups until a batch is full (only the shard's end sends smaller ones), so a shard of
    mixed sizes takes the fewest forward passes, and the boxes, which no longer depend on their neighbours,
    are the same."""
    teacher = request.getfixturevalue(which)
    layout = Layout(str(tmp_path / "root"))
    samples = _samples(11)
    samples[3]["phrases"] = []  # no prompt: never reaches the model, counts in no group
    make_shard(layout, samples)
    config = dataclasses.replace(FAST, batch_size=5, floor_score=0.0, max_boxes_per_image=1000)
    recording = _Recording(teacher, 1)
    _label(layout, LabelShard(recording, config))
    files = _outputs(layout, teacher.teacher_id)
    rows = {r["uid"]: r for r in pq.read_table(io.BytesIO(files[".parquet"])).to_pylist()}
    names = [m.name for m, _ in _members(files[".tar"])]  # written group by group, as the boxes came in
    assert names == [f"{s['uid']}.{suffix}" for s in samples for suffix in ("jpg", "json")], "in key order"

    with_prompts = [s for s in samples if s["phrases"]]
    expected, per_group = {}, {}
    for start in range(0, len(with_prompts), config.batch_size):
        group = with_prompts[start : start + config.batch_size]
        images = [Image.open(io.BytesIO(s["jpeg"])).convert("RGB") for s in group]
        spans = [[(p["start"], p["end"]) for p in _spans(s["caption"], s["phrases"])] for s in group]
        prompts = [teacher.prompts(s["caption"], sp) for s, sp in zip(group, spans)]
        for s, boxes in zip(group, teacher.label_prompts(images, prompts)):
            expected[s["uid"]] = filter_boxes(boxes, config)
        keys = [
            teacher.batch_key(image, p)
            for image, image_prompts in zip(images, prompts)
            for p in image_prompts
        ]
        per_group[start] = Counter(keys)
    per_key = sum(per_group.values(), Counter())
    size = teacher.batch_size
    per_group_and_key = sum(-(-n // size) for counts in per_group.values() for n in counts.values())
    if which == "teacher":  # one key, and each group's last, smaller batch goes at the group's end
        assert list(per_key) == [None] and len(recording.batches) == per_group_and_key
    else:  # 10 images of 3 padded sizes in 2 groups: batches per key, not per group and key
        assert len(per_key) == 3
        assert len(recording.batches) == sum(-(-n // size) for n in per_key.values()) < per_group_and_key
    assert sum(len(boxes) for boxes in expected.values()) > 0
    for uid, boxes in expected.items():
        found = [(b["phrase"], (b["x0"], b["y0"], b["x1"], b["y1"]), b["score"]) for b in rows[uid]["boxes"]]
        assert found == [(b.phrase, tuple(b.box), b.score) for b in boxes]
    assert rows[samples[3]["uid"]]["boxes"] == []


def test_samples_pass_in_key_order_as_soon_as_they_can():
    def sample(key: str, tag: str = "") -> dict:
        return {"__key__": key, "tag": tag}

    def names(items) -> list[str]:
        return [item["__key__"] + item["tag"] if isinstance(item, dict) else item for item in items]

    written = [sample("2"), sample("0"), "problem", sample("1"), sample("9"), sample("1", "+"), sample("3")]
    # "2" waits for "0" and "1"; a tar problem, an unknown key and a passed key's second sample go at once;
    # "4" never comes (missing from the tar): nothing waits on it, the tar's end lets the rest out
    assert names(in_key_order(written, ["0", "1", "2", "3", "4"])) == [
        "0",
        "problem",
        "1",
        "2",
        "9",
        "1+",
        "3",
    ]
    # a key's second sample, written before the key can pass, follows its first (the first in the tar wins)
    assert names(in_key_order([sample("1"), sample("1", "+"), sample("0")], ["0", "1"])) == ["0", "1", "1+"]
    assert names(in_key_order([sample("5"), sample("3")], ["3", "4", "5"])) == ["3", "5"]


class _Recording(_Pipelined):
    """Also records each forward batch as its images' digests."""

    def __init__(self, teacher: Teacher, in_flight: int) -> None:
        super().__init__(teacher, in_flight)
        self.batches: list[list[str]] = []

    def submit(self, images, prompts):
        self.batches.append([hashlib.sha256(image.tobytes()).hexdigest()[:8] for image in images])
        return super().submit(images, prompts)


def test_a_shard_written_in_another_order_gives_the_same_batches_and_bytes(teacher, tmp_path):
    """img2dataset writes a shard's images in the order their downloads finish, so two ingests of one crawl
    give two orders; a forward batch is padded to its largest image (the shipped teacher on 32 world images in
    another order kept other labels on 6), so the stage reads in key order: the same forward batches, the same
    files."""
    samples = _samples(11)
    samples[4]["jpeg"] = samples[4]["jpeg"][: len(samples[4]["jpeg"]) // 2]  # an error row too
    orders = {"written": samples, "shuffled": [samples[i] for i in (6, 2, 9, 0, 4, 10, 1, 8, 3, 7, 5)]}
    config = dataclasses.replace(FAST, batch_size=3, floor_score=0.0, max_boxes_per_image=1000)
    outputs, batches = {}, {}
    for name, written in orders.items():
        recording = _Recording(teacher, 1)
        stage = LabelShard(recording, config)
        layout = Layout(str(tmp_path / name))
        make_shard(layout, written, in_given_order=True)
        job = {"created_at": "2025-01-02T03:04:05+00:00", "teacher": teacher.teacher_id}
        job |= {"config_hash": stage.config_hash, "schema_version": 1}  # one job: one created_at in both
        storage.write_json(layout.fs, layout.label_job(stage.name), job)
        _label(layout, stage)
        outputs[name], batches[name] = _outputs(layout, stage.name), recording.batches
    assert len(batches["written"]) >= 3 and batches["written"] == batches["shuffled"]
    assert outputs["written"] == outputs["shuffled"]
