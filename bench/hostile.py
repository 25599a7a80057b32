"""The hostile-input suite: bad inputs of every kind the engine meets, made on the fly, through the real
components that meet them.

    python bench/hostile.py            # or: make hostile

Each kind DECLARES its expected outcome before it runs: a clear error (exception type + message pattern), a
quarantined record (the reason in an errors table, a ``TarProblem`` or a refused plan row), or acceptance
(a valid image or caption handled as data, with the checks it implies). Any other ending -- another exception,
another reason, silent acceptance, a good record lost beside the bad one, code from a file that ran -- is a
crash. Categories and the components they go through:

- images: ingest's ``checked_image_bytes``, then an image shard labelled by the label stage (the shipped
  teacher, ``pipeline.executor.run_units`` committing the error table), then the student's read of the label
  tar (``student.data.record_image``); the good images of the shard must all be labelled;
- captions: the phrase stage (``graph.run`` in process, spaCy loaded once) over the same shard, then the label
  stage's prompts (a long caption goes through the teacher's prompt windows);
- crawl files: ingest's partition reading and planning (``find_partitions``, ``read_partition``,
  ``build_plan``);
- configs: ``jobs._settings.apply_sets`` (every job's ``--set``) over real sections;
- checkpoints: ``glip.checkpoint.load_any`` / ``read_official_state_dict``;
- tars: ``pipeline.tars.iter_samples``, ``member_index`` and ``write_samples``;
- roots: ``pipeline.graph.pending`` and the stage readers over a root whose ledger lies.

Prints a table (kind, category, expected, got, ok), then as its LAST line one JSON object: ``kinds``,
``handled``, ``crashes``, ``crashed`` (names) and ``seconds``. Exits 1 when anything crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import sys
import tarfile
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

# Runs as `python bench/hostile.py` from anywhere: the repository's packages first.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glip import checkpoint  # noqa: E402
from glip.config import tiny  # noqa: E402
from jobs._settings import apply_sets  # noqa: E402
from pipeline import exports, graph, ingest, seen, storage, tars  # noqa: E402
from pipeline.executor import run_units  # noqa: E402
from pipeline.label import LabelConfig, LabelShard, label_stage  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from pipeline.ledger import Ledger  # noqa: E402
from pipeline.phrases import PhraseConfig  # noqa: E402
from pipeline.schema import (  # noqa: E402
    LABEL_SCHEMA,
    PHRASE_TABLE_SCHEMA,
    SCHEMA_KEY,
    VERSION_KEY,
    SchemaError,
    url_uid,
)
from student.data import GroundedImage, record_image  # noqa: E402
from teacher import Teacher, TeacherConfig  # noqa: E402

TEACHER = REPO / "jobs" / "assets" / "teacher"
SHARD = "crawl-00000/00000"
GOOD_CAPTION = "a red circle next to a blue square"
GOOD_PHRASES = ("a red circle", "a blue square")


# ------------------------------------------------------------------------------------------ expectations


@dataclass(frozen=True)
class Expect:
    """How a kind must end: ``outcome`` is ``error`` (``error`` raised, its message matching ``pattern``),
    ``failed`` (the executor reports the unit failed with an error matching ``pattern``, nothing committed),
    ``quarantined`` (the reason(s) found match ``pattern``) or ``accepted`` (the summary matches
    ``pattern``)."""

    outcome: str
    pattern: str
    error: type[BaseException] | None = None

    def describe(self) -> str:
        if self.outcome == "error":
            return f"{self.error.__name__} /{self.pattern}/"
        return f"{self.outcome} /{self.pattern}/"


def raises(error: type[BaseException], pattern: str) -> Expect:
    return Expect("error", pattern, error)


def quarantined(pattern: str) -> Expect:
    return Expect("quarantined", pattern)


def accepted(pattern: str) -> Expect:
    return Expect("accepted", pattern)


def failed(pattern: str) -> Expect:
    return Expect("failed", pattern)


@dataclass(frozen=True)
class Got:
    """What a kind's run saw: its outcome and a one-line summary (reasons, or what was accepted)."""

    outcome: str
    text: str


class DataLoss(AssertionError):
    """Something already written (or a good record beside the bad one) is missing or changed."""


class CodeRan(AssertionError):
    """Code carried by a file ran."""


def check(condition: bool, message: str, error: type[AssertionError] = DataLoss) -> None:
    if not condition:
        raise error(message)


@dataclass
class Kind:
    name: str
    category: str
    expect: Expect
    run: Callable[[Context], Got]


@dataclass
class Verdict:
    kind: Kind
    got: str
    ok: bool


def judge(kind: Kind, context: Context) -> Verdict:
    """Run one kind and compare how it ended with what it declared."""
    expect = kind.expect
    try:
        got = kind.run(context)
    except Exception as error:  # anything may come out of a hostile input: that is what is measured
        text = f"{type(error).__name__}: {_one_line(error)}"
        ok = (
            expect.outcome == "error"
            and isinstance(error, expect.error)
            and not isinstance(error, DataLoss | CodeRan)
            and re.search(expect.pattern, str(error), re.S) is not None
        )
        return Verdict(kind, text, ok)
    ok = got.outcome == expect.outcome and re.search(expect.pattern, got.text, re.S) is not None
    return Verdict(kind, f"{got.outcome}: {got.text}", ok)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------- inputs


def jpeg(seed: int, size: tuple[int, int] = (96, 72), **options: Any) -> bytes:
    return encode(picture(seed, size), "JPEG", quality=90, **options)


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    """A distinct RGB picture with a red disc (something for the teacher to find)."""
    rng = np.random.default_rng(seed)
    width, height = size
    grid = Image.fromarray(rng.integers(40, 220, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(grid).copy()
    yy, xx = np.mgrid[:height, :width]
    pixels[(xx - width / 3) ** 2 + (yy - height / 3) ** 2 < (min(size) / 5) ** 2] = (230, 20, 20)
    return Image.fromarray(pixels)


def encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def raw_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of exactly these member names (tarfile, not ``pipeline.tars``, which refuses the hostile ones)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels and that holds no pixel data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def sof_bomb_jpeg(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 marker is rewritten to claim ``width`` x ``height``."""
    data = bytearray(jpeg(3, (32, 24)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    """An 80x48 JPEG whose EXIF says "rotate 90 degrees" (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(4, (80, 48), exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [picture(seed, (64, 48)).convert("P") for seed in (5, 6, 7)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def sixteen_bit_png() -> bytes:
    grey = np.asarray(picture(8, (64, 48)).convert("L")).astype(np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
HTML_PAGE = b"<!doctype html><html><head><title>404</title></head><body>Not Found</body></html>"


@dataclass(frozen=True)
class ShardSample:
    """One sample of the shared image shard: the kind it belongs to, the image member's suffix and bytes as
    crawled, and its caption."""

    kind: str
    data: bytes
    caption: str = GOOD_CAPTION
    suffix: str = "jpg"


# The kinds whose input is an image, and the caption kinds (a good image each). Good samples sit between.
IMAGE_INPUTS: dict[str, Callable[[], tuple[bytes, str]]] = {
    "truncated_jpeg": lambda: (jpeg(11)[: len(jpeg(11)) // 2], "jpg"),
    "zero_bytes": lambda: (b"", "jpg"),
    "cmyk_jpeg": lambda: (encode(picture(12, (80, 64)).convert("CMYK"), "JPEG", quality=90), "jpg"),
    "png_16_bit": lambda: (sixteen_bit_png(), "png"),
    "png_alpha": lambda: (encode(picture(13, (64, 48)).convert("RGBA"), "PNG"), "png"),
    "png_palette": lambda: (encode(picture(14, (64, 48)).convert("P"), "PNG"), "png"),
    "gif_animated": lambda: (animated_gif(), "gif"),
    "one_pixel": lambda: (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "png"),
    "exif_rotated": lambda: (exif_rotated_jpeg(), "jpg"),
    "bomb_png_30000": lambda: (header_only_png(30_000, 30_000), "png"),
    "bomb_png_10000": lambda: (header_only_png(10_000, 10_000), "png"),
    "bomb_jpeg_sof_20000": lambda: (sof_bomb_jpeg(20_000, 20_000), "jpg"),
    "svg": lambda: (SVG, "jpg"),
    "html_page": lambda: (HTML_PAGE, "jpg"),
    "extension_lies": lambda: (encode(picture(15, (72, 56)), "PNG"), "jpg"),  # PNG bytes named .jpg
}
CAPTION_INPUTS: dict[str, str] = {
    "caption_empty": "",
    "caption_whitespace": " \t\n  \u00a0 ",
    "caption_10k_chars": "a red circle beside a blue square on a wooden table " * 200,
    "caption_emoji_only": "😀🐶🔥🎉" * 10,
    "caption_not_english": "Un cercle rouge à côté d'un carré bleu sur la table",
    "caption_html": "<p>A <b>red</b> circle &amp; a <i>blue</i> square</p><br/>Buy now",
    "caption_control_chars": "a red\x00 circle\x07 next to\x1b[31m a blue\x7f square\x0b",
    "caption_over_256_tokens": " ".join(["a red circle and a blue square"] * 45),  # 315 words
    "crawl_caption_10mb": "a red circle next to a blue square " * 300_000,
}


# ------------------------------------------------------------------------------------------- the context


@dataclass
class Context:
    """Everything the kinds share: a temporary folder, the shared shard (phrased and labelled once), the
    teacher."""

    tmp: Path
    teacher_config: TeacherConfig
    teacher: Teacher | None = None
    shard_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    shard_error: BaseException | None = None
    counts: dict[str, Any] = field(default_factory=dict)

    def get_teacher(self) -> Teacher:
        if self.teacher is None:
            self.teacher = Teacher.from_checkpoint(self.teacher_config)
        return self.teacher


def shard_samples() -> list[ShardSample]:
    samples = [ShardSample("good", jpeg(100))]
    for kind, make in IMAGE_INPUTS.items():
        data, suffix = make()
        samples += [ShardSample(kind, data, suffix=suffix), ShardSample("good", jpeg(101 + len(samples)))]
    for kind, caption in CAPTION_INPUTS.items():
        samples += [ShardSample(kind, jpeg(300 + len(samples)), caption=caption)]
    return samples


def build_shard(layout: Layout, samples: list[ShardSample]) -> list[dict[str, Any]]:
    """The image shard as ingest leaves it (tar + parquet, img2dataset's layout) and the ingest ledger entry;
    ingest's own image check runs on every image first: what it refuses is a failed row with its reason,
    what it accepts goes in the tar as ingest would write it. Returns one row per sample."""
    members, rows = [], []
    for index, sample in enumerate(samples):
        key = f"{index:09d}"
        url = f"http://127.0.0.1:9/{sample.kind}/{key}.{sample.suffix}"
        checked, reason = ingest.checked_image_bytes(sample.data, ingest.IngestConfig().max_image_pixels)
        status = "success" if reason is None else "failed_to_download"
        if reason is None:  # img2dataset names every image member by its encode_format
            members += [(f"{key}.jpg", checked), (f"{key}.txt", sample.caption.encode())]
        rows.append(
            {
                "key": key,
                "uid": url_uid(url),
                "url": url,
                "caption": sample.caption,
                "status": status,
                "error_message": reason,
                "sha256": hashlib.sha256(sample.data).hexdigest(),
                "kind": sample.kind,
                "suffix": sample.suffix,
            }
        )
    storage.write_bytes(layout.fs, layout.image_shard(SHARD, ".tar"), raw_tar(members))
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k not in ("kind", "suffix")} for r in rows])
    storage.write_parquet(layout.fs, layout.image_shard(SHARD, ".parquet"), table)
    Ledger(layout, "ingest").record(SHARD.split("/")[0], {"shards": [SHARD]})
    return rows


def run_shard(context: Context) -> None:
    """Ingest check, phrase stage and label stage over the shared shard; results per sample uid."""
    layout = Layout(str(context.tmp / "root"))
    rows = build_shard(layout, shard_samples())
    phrases = graph.run(layout, "phrases", PhraseConfig(), in_process=True, progress=False)
    check(phrases.complete, f"the phrase stage failed: {phrases.table()}")
    teacher = context.get_teacher()
    config = LabelConfig(floor_score=0.05, batch_size=8, prefetch_images=8)
    stage = label_stage(teacher.teacher_id)
    check(graph.pending(layout, "phrases") == [], "the phrase unit is still pending")
    results = run_units(
        layout,
        [SHARD],
        lambda: LabelShard(teacher, config),
        stage,
        in_process=True,
        prepare=True,
        progress=False,
    )
    check(results[SHARD].status == "done", f"the label unit failed: {results[SHARD].error}")
    phrase_table = storage.read_parquet(layout.fs, layout.phrase_table(SHARD)).to_pylist()
    phrase_errors = storage.read_parquet(layout.fs, layout.errors("phrases", SHARD)).to_pylist()
    label_rows = storage.read_parquet(layout.fs, layout.label_shard(teacher.teacher_id, SHARD, ".parquet"))
    label_errors = storage.read_parquet(layout.fs, layout.errors(stage, SHARD)).to_pylist()
    label_tar = layout.label_shard(teacher.teacher_id, SHARD, ".tar")
    index = tars.member_index(layout.fs, label_tar)
    by_uid = {r["uid"]: r for r in rows}
    for row in rows:
        row["phrase_row"] = next((p for p in phrase_table if p["uid"] == row["uid"]), None)
        row["phrase_errors"] = [e["reason"] for e in phrase_errors if e["uid"] == row["uid"]]
        row["label_errors"] = [e for e in label_errors if e["uid"] == row["uid"]]
        row["label_row"] = None
    for label_row in label_rows.to_pylist():
        by_uid[label_row["uid"]]["label_row"] = label_row
        member = index.get((label_row["uid"], "jpg"))
        check(member is not None, f"the label tar has no image for {label_row['uid']}")
        record = GroundedImage(
            layout.url_of(label_tar), label_row["width"], label_row["height"], np.zeros((0, 4), np.float32),
            image_range=tuple(member),
        )  # fmt: skip
        by_uid[label_row["uid"]]["student_size"] = record_image(record).size
    context.shard_results = by_uid
    context.counts["phrase_stats"] = Ledger(layout, "phrases").get(SHARD)
    context.counts["label_stats"] = results[SHARD].stats
    goods = [r for r in rows if r["kind"] == "good"]
    lost = [r["key"] for r in goods if r["label_row"] is None]
    check(not lost, f"good samples lost beside the bad ones: {lost}")


def shard_outcome(context: Context, kind: str) -> Got:
    """How the shared shard's stages treated the sample of ``kind``."""
    if context.shard_error is not None:
        raise context.shard_error
    [row] = [r for r in context.shard_results.values() if r["kind"] == kind]
    parts = [f"ingest={row['error_message'] or 'ok'}"]
    if row["phrase_errors"]:
        parts.append(f"phrases={','.join(row['phrase_errors'])}")
    if row["label_errors"]:
        parts.append("label=" + ",".join(e["reason"] for e in row["label_errors"]))
    quarantine = row["status"] != "success" or row["phrase_errors"] or row["label_errors"]
    if row["label_row"] is not None:
        label = row["label_row"]
        size = (label["width"], label["height"])
        check(row.get("student_size") == size, f"student reads {row.get('student_size')}, label wrote {size}")
        texts = [p["text"] for p in label["phrases"]]
        check(
            all(label["caption"][p["start"] : p["end"]] == p["text"] for p in label["phrases"]),
            "a phrase span does not point into its caption",
        )
        check(label["caption"] == row["caption"], "the caption changed on its way to the labels")
        parts.append(f"labelled {size[0]}x{size[1]} phrases={texts[:4]}")
    elif row["status"] == "success" and not row["label_errors"]:
        raise DataLoss(f"{kind}: ingested, then neither labelled nor in an errors table")
    return Got("quarantined" if quarantine else "accepted", " ".join(parts))


def shard_kind(name: str, category: str, expect: Expect) -> Kind:
    return Kind(name, category, expect, lambda context: shard_outcome(context, name))


# -------------------------------------------------------------------------------------------- the kinds

LABELLED = r"labelled (\d+)x(\d+)"


def image_kinds() -> list[Kind]:
    undecodable = r"ingest=(corrupt or truncated image|not an image)"
    return [
        shard_kind("truncated_jpeg", "image", quarantined(r"ingest=corrupt or truncated image")),
        shard_kind("zero_bytes", "image", quarantined(r"ingest=not an image \(unidentified format\)")),
        shard_kind("cmyk_jpeg", "image", accepted(r"ingest=ok labelled 80x64")),
        shard_kind("png_16_bit", "image", accepted(r"ingest=ok labelled 64x48")),
        shard_kind("png_alpha", "image", accepted(r"ingest=ok labelled 64x48")),
        shard_kind("png_palette", "image", accepted(r"ingest=ok labelled 64x48")),
        shard_kind("gif_animated", "image", accepted(r"ingest=ok labelled 64x48")),
        shard_kind("one_pixel", "image", accepted(r"ingest=ok labelled 1x1")),
        # EXIF orientation is not applied: label and student read the stored 80x48 pixels alike.
        shard_kind("exif_rotated", "image", accepted(r"ingest=ok labelled 80x48")),
        shard_kind("bomb_png_30000", "image", quarantined(r"ingest=image too large: .*900000000 pixels")),
        shard_kind("bomb_png_10000", "image", quarantined(r"ingest=image too large: 10000x10000 pixels")),
        shard_kind(
            "bomb_jpeg_sof_20000", "image", quarantined(r"ingest=image too large: .*400000000 pixels")
        ),
        shard_kind("svg", "image", quarantined(undecodable)),
        shard_kind("html_page", "image", quarantined(undecodable)),
        shard_kind("extension_lies", "image", accepted(r"ingest=ok labelled 72x56")),
        Kind(
            "bomb_past_ingest",
            "image",
            quarantined(r"label=image_too_large.*10000x10000.*undecodable"),
            bombs_past_ingest,
        ),  # fmt: skip
    ]


def bombs_past_ingest(context: Context) -> Got:
    """A shard whose images ingest never checked (written by another tool): the label stage's own decode
    refuses the bomb before decoding and quarantines it; the good image beside it is labelled."""
    layout = Layout(str(context.tmp / "root-unchecked"))
    samples = [ShardSample("good", jpeg(1)), ShardSample("bomb", header_only_png(10_000, 10_000), suffix="png"),
               ShardSample("truncated", jpeg(2)[:300]), ShardSample("good", jpeg(3))]  # fmt: skip
    members, rows = [], []
    for index, sample in enumerate(samples):
        key, url = f"{index:09d}", f"http://127.0.0.1:9/unchecked/{index}"
        members.append((f"{key}.{sample.suffix}", sample.data))
        rows.append({"key": key, "uid": url_uid(url), "url": url, "sha256": "", "status": "success",
                     "caption": GOOD_CAPTION})  # fmt: skip
    storage.write_bytes(layout.fs, layout.image_shard(SHARD, ".tar"), raw_tar(members))
    storage.write_parquet(layout.fs, layout.image_shard(SHARD, ".parquet"), pa.Table.from_pylist(rows))
    spans = [
        {"text": p, "start": GOOD_CAPTION.index(p), "end": GOOD_CAPTION.index(p) + len(p)}
        for p in GOOD_PHRASES
    ]
    phrase_rows = [{"uid": r["uid"], "caption": GOOD_CAPTION, "phrases": spans} for r in rows]
    storage.write_parquet(
        layout.fs, layout.phrase_table(SHARD), pa.Table.from_pylist(phrase_rows, schema=PHRASE_TABLE_SCHEMA)
    )
    teacher = context.get_teacher()
    stage = label_stage(teacher.teacher_id)
    result = run_units(layout, [SHARD], lambda: LabelShard(teacher, LabelConfig()), stage, in_process=True,
                       prepare=True, progress=False)[SHARD]  # fmt: skip
    check(result.status == "done", f"label unit failed: {result.error}")
    errors = storage.read_parquet(layout.fs, layout.errors(stage, SHARD)).to_pylist()
    labelled = storage.read_parquet(layout.fs, layout.label_shard(teacher.teacher_id, SHARD, ".parquet"))
    check(sorted(labelled.column("uid").to_pylist()) == sorted([rows[0]["uid"], rows[3]["uid"]]),
          "the good images beside the bomb were not all labelled")  # fmt: skip
    return Got("quarantined", "; ".join(f"label={e['reason']} {e['detail']}" for e in errors))


def caption_kinds() -> list[Kind]:
    return [
        shard_kind("caption_empty", "caption", quarantined(r"^ingest=ok phrases=empty_caption labelled")),
        shard_kind(
            "caption_whitespace", "caption", quarantined(r"^ingest=ok phrases=empty_caption labelled")
        ),
        Kind(
            "caption_10k_chars",
            "caption",
            accepted(r"truncated and counted; ingest=ok labelled .*'a red circle'"),
            lambda c: long_caption(c, "caption_10k_chars"),
        ),  # fmt: skip
        shard_kind(
            "caption_emoji_only", "caption", quarantined(r"^ingest=ok phrases=empty_caption labelled")
        ),
        shard_kind("caption_not_english", "caption", quarantined(r"^ingest=ok phrases=not_english labelled")),
        shard_kind("caption_html", "caption", accepted(r"^ingest=ok labelled .*'A <b>red</b> circle'")),
        shard_kind(
            "caption_control_chars",
            "caption",
            accepted(r"^ingest=ok labelled .*'a red\\x00 circle', 'a blue\\x7f square'"),
        ),
        Kind(
            "caption_over_256_tokens",
            "caption",
            accepted(r"truncated and counted; ingest=ok labelled .*'a red circle'"),
            lambda c: long_caption(c, "caption_over_256_tokens"),
        ),  # fmt: skip
    ]


def long_caption(context: Context, kind: str) -> Got:
    """A caption over the caps: phrases kept from its beginning, the truncation counted in the phrase unit's
    stats, and labelled through the teacher's prompt windows (no ``bad_prompt``)."""
    got = shard_outcome(context, kind)
    truncated = (context.counts.get("phrase_stats") or {}).get("captions_truncated", 0)
    check(truncated >= 3, f"captions_truncated is {truncated}, expected the 3 long captions counted")
    return Got(got.outcome, f"truncated and counted; {got.text}")


def write_crawl(folder: Path, name: str, table: pa.Table | None = None, raw: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        pq.write_table(table, path)
    return path


def plan_of(
    context: Context, name: str, table: pa.Table | None = None, raw: bytes | None = None
) -> ingest.Plan:
    """Read and plan one crawl partition as the ingest stage does (no download)."""
    folder = context.tmp / "crawls" / name
    write_crawl(folder, f"{name}.parquet", table, raw)
    config = ingest.IngestConfig(crawl=str(folder), allow_hosts=("127.0.0.1",), processes_count=1)
    [partition] = ingest.find_partitions(config.crawl)
    urls, captions = ingest.read_partition(partition, config.url_col, config.caption_col)
    rows = pa.table(
        {"uid": seen.uids_to_hex(seen.url_uids(u or "" for u in urls)), "url": urls, "caption": captions}
    )
    return ingest.build_plan(name, partition.url, rows, seen.SeenSet(), config)


GOOD_URLS = [f"http://127.0.0.1:9/img/{i}.jpg" for i in range(3)]


def plan_summary(plan: ingest.Plan, good: list[str] = GOOD_URLS) -> Got:
    planned = plan.download.column("url").to_pylist()
    check(all(url in planned for url in good), f"good rows lost from the plan: {set(good) - set(planned)}")
    refused = sorted(set(plan.refused.column("detail").to_pylist()))
    counts = {k: v for k, v in plan.counts.items() if v}
    if refused:
        return Got("quarantined", f"refused={refused} counts={counts}")
    return Got("accepted", f"counts={counts}")


def crawl_kinds() -> list[Kind]:
    def corrupt(context: Context) -> Got:
        plan_of(context, "corrupt", raw=b"PAR1" + os.urandom(64))
        return Got("accepted", "a corrupt parquet was read")

    def missing(context: Context) -> Got:
        plan_of(context, "missing", pa.table({"url": GOOD_URLS, "text": ["a", "b", "c"]}))
        return Got("accepted", "planned without captions")

    def mistyped(context: Context) -> Got:
        table = pa.table({"url": [*GOOD_URLS, None], "caption": [1.5, 2.5, None, 4.0]})
        table = pa.concat_tables([table, pa.table({"url": pa.array([None], pa.string()), "caption": [5.0]})])
        plan = plan_of(context, "mistyped_caption", table)
        captions = plan.download.column("caption").to_pylist()
        check(captions == ["1.5", "2.5", None], f"captions became {captions}")
        integer_urls = plan_of(context, "mistyped_url", pa.table({"url": [7, 8], "caption": ["a", "b"]}))
        return Got(
            "quarantined", f"{plan_summary(plan).text}; int urls {plan_summary(integer_urls, []).text}"
        )

    def null_urls(context: Context) -> Got:
        table = pa.table(
            {"url": [GOOD_URLS[0], None, GOOD_URLS[1], "", GOOD_URLS[2]], "caption": list("abcde")}
        )
        return plan_summary(plan_of(context, "null_urls", table))

    def duplicates(context: Context) -> Got:
        table = pa.table({"url": GOOD_URLS + GOOD_URLS[:2] * 3, "caption": ["x"] * 9})
        plan = plan_of(context, "duplicates", table)
        check(plan.download.num_rows == 3, f"{plan.download.num_rows} rows planned, expected 3")
        return plan_summary(plan)

    def huge_caption(context: Context) -> Got:
        caption = CAPTION_INPUTS["crawl_caption_10mb"]
        plan = plan_of(context, "huge_caption", pa.table({"url": GOOD_URLS, "caption": [caption, "b", "c"]}))
        check(plan.download.column("caption").to_pylist()[0] == caption, "the 10 MB caption was changed")
        got = shard_outcome(context, "crawl_caption_10mb")
        return Got(got.outcome, f"{plan_summary(plan).text}; {got.text}")

    return [
        Kind(
            "crawl_corrupt_parquet",
            "crawl",
            raises(pa.ArrowInvalid, r"corrupt\.parquet.*magic bytes"),
            corrupt,
        ),
        Kind(
            "crawl_missing_column",
            "crawl",
            raises(ValueError, r"missing\.parquet: no column \['caption'\]"),
            missing,
        ),  # fmt: skip
        Kind(
            "crawl_mistyped_columns",
            "crawl",
            quarantined(
                r"refused=\['invalid url: empty'\].*"
                r"int urls refused=\['scheme not allowed: none'\]"
            ),
            mistyped,
        ),  # fmt: skip
        Kind(
            "crawl_null_urls",
            "crawl",
            quarantined(r"refused=\['invalid url: empty'\].*'refused': 2\b"),
            null_urls,
        ),
        Kind("crawl_duplicate_rows", "crawl", accepted(r"'duplicate_in_partition': 6"), duplicates),
        Kind(
            "crawl_caption_10mb",
            "crawl",
            accepted(r"'to_download': 3.*ingest=ok labelled .*'a red circle'"),
            huge_caption,
        ),  # fmt: skip
    ]


def config_kinds() -> list[Kind]:
    sections = {
        "model": tiny(),
        "phrases": PhraseConfig(),
        "label": LabelConfig(),
        "ingest": ingest.IngestConfig(processes_count=1),
    }

    def sets(*items: str) -> Callable[[Context], Got]:
        def run(context: Context) -> Got:
            result = apply_sets(list(items), sections)
            return Got("accepted", f"{items} applied: {[result[k] != sections[k] for k in sections]}")

        return run

    return [
        Kind(
            "config_unknown_key",
            "config",
            raises(KeyError, r"unknown config key 'max_phrases'; valid: \["),
            sets("phrases.max_phrases=3"),
        ),  # fmt: skip
        Kind(
            "config_unknown_nested_key",
            "config",
            raises(
                KeyError,
                r"unknown config key 'head.nope' "
                r"\(in 'head'\); valid",
            ),
            sets("model.head.nope=1"),
        ),  # fmt: skip
        Kind(
            "config_unknown_section",
            "config",
            raises(KeyError, r"unknown section 'optim'"),
            sets("optim.lr=1"),
        ),
        Kind(
            "config_wrong_type",
            "config",
            raises(ValueError, r"'batch_size' expects int, got 'many'"),
            sets("label.batch_size=many"),
        ),  # fmt: skip
        Kind(
            "config_float_for_int",
            "config",
            raises(ValueError, r"'head.num_convs' expects int, got '2.5'"),
            sets("model.head.num_convs=2.5"),
        ),  # fmt: skip
        Kind(
            "config_contradiction",
            "config",
            raises(ValueError, r"min_size 2000 > max_size"),
            sets("model.input.min_size=2000", "model.input.max_size=1000"),
        ),  # fmt: skip
        Kind(
            "config_out_of_range",
            "config",
            raises(ValueError, r"nms_iou must be in \[0, 1\]"),
            sets("label.nms_iou=2"),
        ),  # fmt: skip
        Kind(
            "config_malformed_item",
            "config",
            raises(ValueError, r"not of the form SECTION.KEY=VALUE"),
            sets("label.batch_size"),
        ),  # fmt: skip
    ]


def checkpoint_copy(context: Context, name: str) -> Path:
    folder = context.tmp / "checkpoints" / name
    shutil.copytree(TEACHER, folder)
    return folder


def lying_header(data: bytes) -> bytes:
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 10**12  # a terabyte claimed
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]


def checkpoint_kinds() -> list[Kind]:
    def load(context: Context, name: str, change: Callable[[Path], None]) -> Got:
        folder = checkpoint_copy(context, name)
        change(folder)
        checkpoint.load_any(folder)
        return Got("accepted", f"{name} loaded")

    def truncated(folder: Path) -> None:
        weights = folder / checkpoint.WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def lying(folder: Path) -> None:
        weights = folder / checkpoint.WEIGHTS_FILE
        weights.write_bytes(lying_header(weights.read_bytes()))

    def wrong_shapes(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        weights = folder / checkpoint.WEIGHTS_FILE
        state = load_file(str(weights))
        name = sorted(k for k in state if k.endswith(".weight") and state[k].dim() == 2)[0]
        state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
        save_file(state, str(weights))

    def bad_config(folder: Path) -> None:
        (folder / checkpoint.CONFIG_FILE).write_text('{"format_version": 1, "config": ')

    def pickle_payload(context: Context) -> Got:
        marker = context.tmp / "the-pickle-payload-ran"

        class Payload:
            def __reduce__(self):
                return (os.mkdir, (str(marker),))

        path = context.tmp / "checkpoints" / "evil.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": {"x": torch.zeros(1)}, "payload": Payload()}, path)
        try:
            checkpoint.load_any(path, official_config="tiny")
        finally:
            check(not marker.exists(), "the pickle's payload ran", CodeRan)
        return Got("accepted", "the pickle loaded")

    return [
        Kind(
            "checkpoint_truncated",
            "checkpoint",
            raises(checkpoint.CheckpointError, r"model\.safetensors: not a readable safetensors file"),
            lambda c: load(c, "truncated", truncated),
        ),  # fmt: skip
        Kind(
            "checkpoint_lying_header",
            "checkpoint",
            raises(checkpoint.CheckpointError, r"model\.safetensors: not a readable safetensors file"),
            lambda c: load(c, "lying", lying),
        ),  # fmt: skip
        Kind(
            "checkpoint_wrong_shapes",
            "checkpoint",
            raises(checkpoint.CheckpointError, r"wrong_shapes does not match its config.*shape mismatches"),
            lambda c: load(c, "wrong_shapes", wrong_shapes),
        ),  # fmt: skip
        Kind(
            "checkpoint_bad_config",
            "checkpoint",
            raises(checkpoint.CheckpointError, r"config\.json: not a readable checkpoint config"),
            lambda c: load(c, "bad_config", bad_config),
        ),  # fmt: skip
        Kind(
            "checkpoint_pickle_runs_code",
            "checkpoint",
            raises(checkpoint.CheckpointError, r"evil\.pth: not a weights-only PyTorch checkpoint"),
            pickle_payload,
        ),  # fmt: skip
    ]


def hostile_tar(context: Context, name: str, members: list[tuple[str, bytes | tarfile.TarInfo]]) -> str:
    """A tar of a good sample, the hostile members, and another good sample."""
    path = context.tmp / "tars" / f"{name}.tar"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for member_name, data in [("good1.jpg", b"1"), *members, ("good2.jpg", b"2")]:
            if isinstance(data, tarfile.TarInfo):
                data.name = member_name
                archive.addfile(data)
            else:
                info = tarfile.TarInfo(member_name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return str(path)


def read_tar(context: Context, name: str, members: list[tuple[str, bytes | tarfile.TarInfo]]) -> Got:
    import fsspec

    fs = fsspec.filesystem("file")
    path = hostile_tar(context, name, members)
    items = list(tars.iter_samples(fs, path))
    samples = [i["__key__"] for i in items if not isinstance(i, tars.TarProblem)]
    problems = [i for i in items if isinstance(i, tars.TarProblem)]
    check(samples == ["good1", "good2"], f"samples read: {samples}")
    index = sorted(tars.member_index(fs, path))
    check(index == [("good1", "jpg"), ("good2", "jpg")], f"member_index disagrees: {index}")
    return Got("quarantined", "; ".join(f"{p.reason} {p.detail}" for p in problems) or "nothing reported")


def link(kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo("")
    info.type, info.linkname = kind, target
    return info


def tar_kinds() -> list[Kind]:
    def write(context: Context) -> Got:
        import fsspec

        path = context.tmp / "tars" / "written.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        tars.write_samples(fsspec.filesystem("file"), str(path), [{"__key__": "a", "x/../../escaped": b"1"}])
        return Got("accepted", f"written: {tarfile.open(path).getnames()}")

    return [
        Kind(
            "tar_dotdot_member",
            "tar",
            quarantined(r"^unsafe_member_name '\.\./x\.jpg'$"),
            lambda c: read_tar(c, "dotdot", [("../x.jpg", b"evil")]),
        ),  # fmt: skip
        Kind(
            "tar_absolute_member",
            "tar",
            quarantined(r"^unsafe_member_name '/abs\.jpg'$"),
            lambda c: read_tar(c, "absolute", [("/abs.jpg", b"evil")]),
        ),  # fmt: skip
        Kind(
            "tar_symlink_member",
            "tar",
            quarantined(r"^non_regular_member 'link\.jpg': symbolic link to '/etc/passwd'$"),
            lambda c: read_tar(c, "symlink", [("link.jpg", link(tarfile.SYMTYPE, "/etc/passwd"))]),
        ),  # fmt: skip
        Kind(
            "tar_hardlink_member",
            "tar",
            quarantined(r"^non_regular_member 'hard\.jpg': hard link to 'good1\.jpg'$"),
            lambda c: read_tar(c, "hardlink", [("hard.jpg", link(tarfile.LNKTYPE, "good1.jpg"))]),
        ),  # fmt: skip
        Kind(
            "tar_write_escaping_suffix",
            "tar",
            raises(ValueError, r"unsafe member name 'a\.x/\.\./\.\./escaped'"),
            write,
        ),  # fmt: skip
    ]


def root_kinds() -> list[Kind]:
    def ledger_without_file(context: Context) -> Got:
        layout = Layout(str(context.tmp / "root-lying-ledger"))
        build_shard(layout, [ShardSample("good", jpeg(1))])
        Ledger(layout, "phrases").record(SHARD, {"rows": 1})  # its phrase table was never written
        teacher = context.get_teacher()
        stage = label_stage(teacher.teacher_id)
        pending = graph.pending(layout, "phrases")
        check(pending == [], f"phrases pending: {pending}")
        result = run_units(layout, [SHARD], lambda: LabelShard(teacher), stage, in_process=True, prepare=True,
                           max_attempts=1, progress=False)[SHARD]  # fmt: skip
        check(not Ledger(layout, stage).is_done(SHARD), "a failed unit got a ledger entry")
        return Got(result.status, result.error or "")

    def newer_label_shard(context: Context) -> Got:
        layout = Layout(str(context.tmp / "root-newer-labels"))
        metadata = {SCHEMA_KEY: b"label", VERSION_KEY: b"99"}
        table = LABEL_SCHEMA.empty_table().replace_schema_metadata(metadata)
        storage.write_parquet(layout.fs, layout.label_shard("t", SHARD, ".parquet"), table)
        Ledger(layout, label_stage("t")).record(SHARD, {})
        exports.read_labels(layout, "t")
        return Got("accepted", "a shard of schema version 99 was read")

    def newer_phrase_table(context: Context) -> Got:
        layout = Layout(str(context.tmp / "root-newer-phrases"))
        build_shard(layout, [ShardSample("good", jpeg(1))])
        table = PHRASE_TABLE_SCHEMA.empty_table().replace_schema_metadata(
            {SCHEMA_KEY: b"phrases", VERSION_KEY: b"2"}
        )
        storage.write_parquet(layout.fs, layout.phrase_table(SHARD), table)
        Ledger(layout, "phrases").record(SHARD, {"rows": 0})
        teacher = context.get_teacher()
        stage = label_stage(teacher.teacher_id)
        check(graph.pending(layout, "phrases") == [], "phrases pending")
        result = run_units(layout, [SHARD], lambda: LabelShard(teacher), stage, in_process=True, prepare=True,
                           max_attempts=1, progress=False)[SHARD]  # fmt: skip
        check(
            not Ledger(layout, stage).is_done(SHARD), "a unit that read a table of another version got done"
        )
        return Got(result.status, result.error or "")

    def ingest_ledger_without_shard(context: Context) -> Got:
        layout = Layout(str(context.tmp / "root-lying-ingest"))
        Ledger(layout, "ingest").record("crawl-00000", {"shards": [SHARD]})
        check(graph.pending(layout, "phrases") == [SHARD], "the lying entry's shard is not pending")
        result = graph.run(layout, "phrases", PhraseConfig(), in_process=True, progress=False, max_attempts=1)
        check(not Ledger(layout, "phrases").is_done(SHARD), "a failed unit got a ledger entry")
        return Got(result.results[SHARD].status, result.results[SHARD].error or "")

    return [
        Kind(
            "root_ledger_entry_file_missing",
            "root",
            failed(r"FileNotFoundError.*phrases/crawl-00000/00000\.parquet"),
            ledger_without_file,
        ),  # fmt: skip
        Kind(
            "root_ingest_entry_shard_missing",
            "root",
            failed(r"FileNotFoundError.*images/crawl-00000/00000\.parquet"),
            ingest_ledger_without_shard,
        ),  # fmt: skip
        Kind(
            "root_newer_label_schema",
            "root",
            raises(
                SchemaError,
                r"labels/t/crawl-00000/00000\.parquet.*"
                r"schema_version is b'99', expected b'2'",
            ),
            newer_label_shard,
        ),  # fmt: skip
        Kind(
            "root_newer_phrase_schema",
            "root",
            failed(
                r"SchemaError.*phrases/crawl-00000/00000\.parquet.*"
                r"schema_version is b'2', expected b'1'"
            ),
            newer_phrase_table,
        ),  # fmt: skip
    ]


def all_kinds() -> list[Kind]:
    return [*image_kinds(), *caption_kinds(), *crawl_kinds(), *config_kinds(), *checkpoint_kinds(),
            *tar_kinds(), *root_kinds()]  # fmt: skip


# ---------------------------------------------------------------------------------------------- running


def run_suite(tmp: Path, teacher_config: TeacherConfig | None = None) -> tuple[list[Verdict], dict[str, Any]]:
    """Every kind, in order; the shared shard is phrased and labelled once, first."""
    started = time.perf_counter()
    context = Context(tmp, teacher_config or default_teacher_config())
    kinds = all_kinds()
    try:
        run_shard(context)
    except Exception as error:  # every kind that reads the shared shard reports it as its crash
        context.shard_error = error
    verdicts = [judge(kind, context) for kind in kinds]
    crashed = [v.kind.name for v in verdicts if not v.ok]
    summary = {
        "kinds": len(verdicts),
        "handled": len(verdicts) - len(crashed),
        "crashes": len(crashed),
        "crashed": crashed,
        "categories": sorted({v.kind.category for v in verdicts}),
        "captions_truncated": (context.counts.get("phrase_stats") or {}).get("captions_truncated"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return verdicts, summary


def default_teacher_config() -> TeacherConfig:
    """The shipped teacher on CPU at small input sizes (the suite is about inputs, not accuracy)."""
    return TeacherConfig(str(TEACHER), device="cpu", amp=False, batch_size=8,
                         overrides=("input.min_size=96", "input.max_size=160"))  # fmt: skip


def table(verdicts: list[Verdict]) -> str:
    lines = [f"{'kind':<32} {'category':<11} {'ok':<5} expected -> got"]
    for verdict in verdicts:
        kind = verdict.kind
        got = verdict.got if len(verdict.got) <= 220 else verdict.got[:217] + "..."
        lines.append(f"{kind.name:<32} {kind.category:<11} {'ok' if verdict.ok else 'CRASH':<5} "
                     f"{kind.expect.describe()} -> {got}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keep", type=Path, help="work in this folder and keep it (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # PIL's, at open; we refuse
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        verdicts, summary = run_suite(args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="hostile-") as folder:
            verdicts, summary = run_suite(Path(folder))
    print(table(verdicts))
    print(json.dumps(summary, sort_keys=True))
    return 1 if summary["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
