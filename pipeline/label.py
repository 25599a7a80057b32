"""The label stage: a teacher GLIP grounds each image shard's caption phrases; filtered boxes become a
pseudo-label shard.

Per image shard ``<partition>/<NNNNN>`` (inputs: ``<root>/images/<shard>.tar`` + ``.parquet`` from ingest, the
phrase table ``<root>/phrases/<shard>.parquet``), ``LabelShard`` writes under ``<root>/labels/<teacher>/``:

- ``<shard>.parquet``: one row per labelled image, ``pipeline.schema.LABEL_SCHEMA``, sorted by uid;
- ``<shard>.tar``: per image ``<uid>.jpg`` (the original bytes, never re-encoded; the source member's
  extension is kept) and ``<uid>.json`` (its ODVG grounding record plus provenance); with
  ``label_only_tars`` only the json, aligned with the image shard;
- ``<shard>.errors.parquet``: ``ERROR_SCHEMA`` rows for inputs that could not be labelled (see ``REASONS``);

each atomically, and then, last, the ledger entry of stage ``label-<teacher>`` (unit = shard) with the
shard's stats. Output bytes are a function of the inputs, the teacher and the config only: rows and tar
members are sorted, tar headers are fixed, and ``created_at`` is the labeling job's, read from
``<root>/labels/<teacher>/_job.json`` (written once, by ``prepare_job``), so a re-run after a crash
rewrites identical files.

Filters (pure functions over one image's ``PhraseBox`` list) run in this order: score threshold (GLIP's
Cap24M kept boxes scoring > 0.5), minimum box side, NMS (``per_phrase`` as mmdetection's pseudo-label tool,
``global`` across phrases as GRIT, or ``none``), then a cap on boxes per image.

No Ray here: ``pipeline.graph`` runs ``LabelShard`` inside actors; ``label_shards_inprocess`` runs it in this
process.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import logging
import queue
import re
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision.ops import batched_nms, nms

from pipeline import storage
from pipeline.ledger import Ledger
from pipeline.schema import ERROR_SCHEMA, LABEL_SCHEMA, SCHEMA_VERSION, odvg_record, validate
from teacher.teacher import PhraseBox

if TYPE_CHECKING:
    import fsspec

    from teacher.teacher import Teacher

logger = logging.getLogger(__name__)

STAGE_PREFIX = "label"
ERROR_STAGE = "label"
JOB_FILE = "_job.json"
NMS_MODES = ("per_phrase", "global", "none")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
REASONS = {
    "undecodable_image": "the image bytes do not decode (truncated, corrupt, not an image)",
    "missing_image": "a successful ingest row whose image is not in the tar",
    "unknown_tar_member": "an image in the tar with no successful ingest row",
    "duplicate_image": "a second image for a uid already seen in the shard",
    "missing_phrases": "no row in the phrase table for the uid",
    "bad_prompt": "the phrase spans do not fit the caption or a phrase exceeds the token limit",
    "tar_read_error": "the tar is truncated or corrupt from this point on",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TAR_MODE = 0o644


@dataclass(frozen=True)
class LabelConfig:
    """Settings of the label stage.

    Attributes:
        score_threshold: keep boxes scoring strictly above this (GLIP Cap24M: 0.5; GRIT: 0.65).
        nms: ``per_phrase`` (boxes of one phrase suppress each other), ``global`` (any box suppresses any
            other, as GRIT) or ``none``.
        nms_iou: IoU above which NMS suppresses.
        min_box_size: boxes narrower or lower than this many pixels are dropped (zero-area ones always are).
        max_boxes_per_image: the highest-scoring boxes kept per image.
        drop_images_without_boxes: leave images with no surviving box out of the outputs (GRIT discarded
            them); they are counted either way.
        batch_size: images handed to the teacher at once (it splits them into its own forward batches).
        prefetch_images: decoded images queued ahead of inference by the decoding thread.
        label_only_tars: tars carry only the json records, aligned with the image shards.
        round: the self-training round recorded in every row.
        teacher: output folder / ledger name; default the teacher's ``teacher_id``.
    """

    score_threshold: float = 0.5
    nms: str = "per_phrase"
    nms_iou: float = 0.5
    min_box_size: float = 0.0
    max_boxes_per_image: int = 100
    drop_images_without_boxes: bool = False
    batch_size: int = 16
    prefetch_images: int = 64
    label_only_tars: bool = False
    round: int = 0
    teacher: str | None = None

    def __post_init__(self) -> None:
        if self.nms not in NMS_MODES:
            raise ValueError(f"LabelConfig.nms {self.nms!r} is not one of {NMS_MODES}")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"LabelConfig.nms_iou must be in [0, 1], got {self.nms_iou}")
        for name in ("max_boxes_per_image", "batch_size", "prefetch_images"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LabelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_box_size < 0 or self.round < 0:
            raise ValueError("LabelConfig.min_box_size and round must be >= 0")
        if self.teacher is not None and not _NAME.match(self.teacher):
            raise ValueError(f"LabelConfig.teacher {self.teacher!r}: use letters, digits, '.', '_' and '-'")

    def digest_fields(self) -> dict[str, Any]:
        """The settings that change output content (not prefetching, not the folder name)."""
        values = dataclasses.asdict(self)
        values.pop("prefetch_images")
        values.pop("teacher")
        return values


# ------------------------------------------------------------------------------------------------ filters


def above_threshold(boxes: Sequence[PhraseBox], threshold: float) -> list[PhraseBox]:
    """Boxes with ``score > threshold``."""
    return [b for b in boxes if b.score > threshold]


def large_enough(boxes: Sequence[PhraseBox], min_size: float) -> list[PhraseBox]:
    """Boxes with positive area whose width and height are both at least ``min_size`` pixels."""
    kept = []
    for b in boxes:
        width, height = b.box[2] - b.box[0], b.box[3] - b.box[1]
        if width > 0 and height > 0 and width >= min_size and height >= min_size:
            kept.append(b)
    return kept


def suppress(boxes: Sequence[PhraseBox], mode: str, iou: float) -> list[PhraseBox]:
    """Non-maximum suppression: ``per_phrase``, ``global`` or ``none``; the result is sorted by score."""
    if mode not in NMS_MODES:
        raise ValueError(f"nms mode {mode!r} is not one of {NMS_MODES}")
    ordered = sorted(boxes, key=_box_order)
    if mode == "none" or len(ordered) < 2:
        return ordered
    coordinates = torch.tensor([b.box for b in ordered], dtype=torch.float32)  # [N, 4] xyxy
    scores = torch.tensor([b.score for b in ordered], dtype=torch.float32)
    if mode == "global":
        keep = nms(coordinates, scores, iou)
    else:
        keep = batched_nms(coordinates, scores, torch.tensor([b.phrase for b in ordered]), iou)
    return [ordered[i] for i in sorted(keep.tolist())]


def top_k(boxes: Sequence[PhraseBox], k: int) -> list[PhraseBox]:
    """The ``k`` highest-scoring boxes (ties broken by phrase, then coordinates)."""
    return sorted(boxes, key=_box_order)[:k]


def filter_boxes(boxes: Sequence[PhraseBox], config: LabelConfig) -> list[PhraseBox]:
    """Threshold, minimum size, NMS, cap: the boxes of one image that become pseudo-labels."""
    kept = above_threshold(boxes, config.score_threshold)
    kept = large_enough(kept, config.min_box_size)
    kept = suppress(kept, config.nms, config.nms_iou)
    return top_k(kept, config.max_boxes_per_image)


def _box_order(box: PhraseBox) -> tuple:
    return (-box.score, box.phrase, tuple(box.box))


# ---------------------------------------------------------------------------------------------- job file


def label_stage(teacher: str) -> str:
    """The ledger stage of a teacher's labels."""
    return f"{STAGE_PREFIX}-{teacher}"


def prepare_job(
    root: str,
    teacher: str,
    teacher_id: str | None = None,
    config_hash: str | None = None,
    **storage_options: Any,
) -> dict:
    """Read ``<root>/labels/<teacher>/_job.json``, writing it first if absent; returns it.

    Its ``created_at`` is stamped on every row of the job, so that reruns and resumed runs write identical
    files. Call it once on the driver, before shards go to workers, with the folder name only (workers that
    all find the file absent at once would each stamp their own time); each ``LabelShard`` then calls it
    with its ``teacher_id`` and ``config_hash``, which are added to the file on first use and must match
    afterwards (ValueError otherwise: one folder never mixes teachers or configs).
    """
    fs, root_path = storage.filesystem(root, **storage_options)
    path = storage.join(root_path, "labels", teacher, JOB_FILE)
    if not fs.exists(path):
        now = _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
        storage.write_json(fs, path, {"created_at": now, "schema_version": SCHEMA_VERSION})
        logger.info("label job %s started at %s", teacher, now)
    job = storage.read_json(fs, path)
    claims = {k: v for k, v in (("teacher", teacher_id), ("config_hash", config_hash)) if v is not None}
    conflicts = {k: job[k] for k, v in claims.items() if job.get(k) not in (None, v)}
    if conflicts:
        raise ValueError(
            f"{path} belongs to {conflicts}, not {claims}: label into another folder (LabelConfig.teacher)"
        )
    if any(k not in job for k in claims):
        job.update(claims)
        storage.write_json(fs, path, job)
    return job


# ------------------------------------------------------------------------------------------- reading


class _ShardInputs(NamedTuple):
    """``rows``: ingest row (uid, url, sha256) per tar key; ``phrases``: (caption, phrases) per uid."""

    rows: dict[str, dict[str, Any]]
    phrases: dict[str, tuple[str, list[dict[str, Any]]]]


class _Decoded(NamedTuple):
    """One tar image: ``image`` None with ``error`` set when it does not decode; ``key`` None for a tar
    read error (``error`` says what)."""

    key: str | None
    extension: str
    data: bytes
    image: Image.Image | None
    error: str | None


def _read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str]) -> pa.Table:
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def _read_inputs(fs: fsspec.AbstractFileSystem, root_path: str, shard: str) -> _ShardInputs:
    images = _read_parquet(
        fs, storage.join(root_path, "images", f"{shard}.parquet"), ["key", "uid", "url", "sha256", "status"]
    )
    images = images.filter(pc.equal(images.column("status"), "success"))
    rows = {r["key"]: r for r in images.select(["key", "uid", "url", "sha256"]).to_pylist()}
    phrase_table = _read_parquet(
        fs, storage.join(root_path, "phrases", f"{shard}.parquet"), ["uid", "caption", "phrases"]
    )
    phrases = {r["uid"]: (r["caption"], r["phrases"] or []) for r in phrase_table.to_pylist()}
    return _ShardInputs(rows, phrases)


def _tar_images(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[_Decoded]:
    """Stream the image members of a webdataset tar, decoded; a corrupt tar ends with one error item.

    Storage errors (OSError other than a tar's) propagate: the unit fails and is retried, never recorded."""
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for member in tar:
                key, _, extension = member.name.rsplit("/", 1)[-1].partition(".")
                if not member.isfile() or extension.lower() not in IMAGE_EXTENSIONS:
                    continue
                data = tar.extractfile(member).read()
                image, error = decode_image(data)
                yield _Decoded(key, extension, data, image, error)
    except (tarfile.TarError, EOFError) as error:
        yield _Decoded(None, "", b"", None, f"{type(error).__name__}: {error}")


def decode_image(data: bytes) -> tuple[Image.Image | None, str | None]:
    """``(RGB image, None)`` or ``(None, reason)`` for bytes that do not decode completely."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB"), None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return None, f"{type(error).__name__}: {error}"


def in_background(items: Iterator[Any], maxsize: int) -> Iterator[Any]:
    """Iterate ``items`` in a thread, at most ``maxsize`` ahead of the consumer (decoding overlaps
    inference: PIL releases the GIL while decoding, torch while computing). An exception in the thread is
    re-raised in the consumer; closing the consumer stops the thread."""
    buffer: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()
    finished = object()

    def produce() -> None:
        try:
            for item in items:
                if not _put(buffer, item, stop):
                    return
        except Exception as error:  # handed over to the consumer, which re-raises it
            _put(buffer, _Failure(error), stop)
            return
        _put(buffer, finished, stop)

    thread = threading.Thread(target=produce, name="label-decode", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not finished:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class _Failure(NamedTuple):
    error: Exception


def _put(buffer: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            buffer.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


# ------------------------------------------------------------------------------------------- labelling


@dataclass
class _Image:
    """A labelled image before it becomes a row."""

    uid: str
    url: str | None
    sha256: str | None
    caption: str
    phrases: list[dict[str, Any]]
    width: int
    height: int
    extension: str
    data: bytes
    boxes: list[PhraseBox] = field(default_factory=list)


@dataclass
class _Collected:
    images: list[_Image] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def error(self, uid: str | None, reason: str, detail: str | None = None) -> None:
        self.errors.append({"uid": uid, "stage": ERROR_STAGE, "reason": reason, "detail": detail})


class LabelShard:
    """The label stage for one image shard, holding a teacher (a Ray actor runs one of these).

    Args:
        teacher: the ``Teacher`` (any object with ``teacher_id``, ``config_hash``, ``prompts`` and
            ``label_prompts`` as ``teacher.Teacher``).
        config: the stage settings.
        storage_options: fsspec options for the root (e.g. S3 endpoint and keys).
    """

    def __init__(
        self,
        teacher: Teacher,
        config: LabelConfig | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.teacher = teacher
        self.config = config or LabelConfig()
        self.storage_options = dict(storage_options or {})
        self.name = self.config.teacher or teacher.teacher_id
        if not _NAME.match(self.name):
            raise ValueError(f"teacher name {self.name!r}: use letters, digits, '.', '_' and '-'")
        payload = {"teacher": teacher.config_hash, "label": self.config.digest_fields()}
        self.config_hash = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def stage(self) -> str:
        return label_stage(self.name)

    def prepare(self, root: str) -> dict:
        """``prepare_job`` for this teacher and config (call once per job, on the driver)."""
        return prepare_job(root, self.name, self.teacher.teacher_id, self.config_hash, **self.storage_options)

    def __call__(self, root: str, shard: str) -> dict[str, Any]:
        """Label shard ``<partition>/<NNNNN>`` under ``root``; returns the ledger entry (its stats)."""
        started = time.perf_counter()
        job = self.prepare(root)
        fs, root_path = storage.filesystem(root, **self.storage_options)
        inputs = _read_inputs(fs, root_path, shard)
        collected = self._collect(inputs, fs, storage.join(root_path, "images", f"{shard}.tar"))
        table = self._table(collected.images, shard, job["created_at"])
        errors = pa.Table.from_pylist(sorted(collected.errors, key=_error_order), schema=ERROR_SCHEMA)
        output = storage.join(root_path, "labels", self.name, shard)
        _write_parquet(fs, f"{output}.parquet", table)
        _write_tar(fs, f"{output}.tar", self._tar_members(table, collected.images), job["created_at"])
        _write_parquet(fs, f"{output}.errors.parquet", errors)
        entry = self._stats(collected, table, errors, job, time.perf_counter() - started)
        logger.info(
            "label %s/%s: %d images, %d boxes, %d errors in %.1fs",
            self.name,
            shard,
            entry["images"],
            entry["boxes"],
            entry["errors"],
            entry["seconds"],
        )
        return Ledger(root, self.stage, **self.storage_options).record(shard, entry)

    def _collect(self, inputs: _ShardInputs, fs: fsspec.AbstractFileSystem, tar_path: str) -> _Collected:
        collected = _Collected()
        pending: list[tuple[_Image, Image.Image, list]] = []
        for decoded in in_background(_tar_images(fs, tar_path), self.config.prefetch_images):
            item = self._admit(decoded, inputs, collected)
            if item is not None:
                pending.append(item)
            if len(pending) >= self.config.batch_size:
                self._label(pending, collected)
                pending = []
        self._label(pending, collected)
        for key, row in inputs.rows.items():
            if row["uid"] not in collected.seen:
                collected.error(row["uid"], "missing_image", f"tar key {key}")
        return collected

    def _admit(
        self, decoded: _Decoded, inputs: _ShardInputs, collected: _Collected
    ) -> tuple[_Image, Image.Image, list] | None:
        """Check one decoded tar image; returns what to label, or None (error recorded, or no phrases)."""
        if decoded.key is None:
            collected.error(None, "tar_read_error", decoded.error)
            return None
        row = inputs.rows.get(decoded.key)
        if row is None:
            collected.error(None, "unknown_tar_member", f"tar key {decoded.key}")
            return None
        uid = row["uid"]
        if uid in collected.seen:
            collected.error(uid, "duplicate_image", f"tar key {decoded.key}")
            return None
        collected.seen.add(uid)
        if decoded.image is None:
            collected.error(uid, "undecodable_image", decoded.error)
            return None
        if uid not in inputs.phrases:
            collected.error(uid, "missing_phrases")
            return None
        caption, phrases = inputs.phrases[uid]
        width, height = decoded.image.size
        image = _Image(
            uid,
            row["url"],
            row["sha256"],
            caption,
            phrases,
            width,
            height,
            decoded.extension,
            b"" if self.config.label_only_tars else decoded.data,
        )
        try:
            prompts = self.teacher.prompts(caption, [(p["start"], p["end"]) for p in phrases])
        except ValueError as error:
            collected.error(uid, "bad_prompt", str(error))
            return None
        collected.images.append(image)
        return (image, decoded.image, prompts) if prompts else None

    def _label(self, pending: list[tuple[_Image, Image.Image, list]], collected: _Collected) -> None:
        if not pending:
            return
        found = self.teacher.label_prompts([p[1] for p in pending], [p[2] for p in pending])
        for (image, _, _), boxes in zip(pending, found):
            image.boxes = filter_boxes(boxes, self.config)

    def _table(self, images: list[_Image], shard: str, created_at: str) -> pa.Table:
        kept = [i for i in images if i.boxes or not self.config.drop_images_without_boxes]
        rows = [self._row(image, shard, created_at) for image in sorted(kept, key=lambda i: i.uid)]
        table = pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)
        validate(table)
        return table

    def _row(self, image: _Image, shard: str, created_at: str) -> dict[str, Any]:
        boxes = [
            {
                "phrase": b.phrase,
                "x0": b.box[0],
                "y0": b.box[1],
                "x1": b.box[2],
                "y1": b.box[3],
                "score": b.score,
            }
            for b in image.boxes
        ]
        return {
            "uid": image.uid,
            "url": image.url,
            "sha256": image.sha256,
            "source_shard": shard,
            "width": image.width,
            "height": image.height,
            "caption": image.caption,
            "phrases": image.phrases,
            "boxes": boxes,
            "teacher": self.teacher.teacher_id,
            "round": self.config.round,
            "config_hash": self.config_hash,
            "created_at": created_at,
        }

    def _tar_members(self, table: pa.Table, images: list[_Image]) -> list[tuple[str, bytes]]:
        """``(name, bytes)`` per member; records are built from the table so json and parquet agree."""
        by_uid = {image.uid: image for image in images}
        members = []
        for row in table.to_pylist():
            image = by_uid[row["uid"]]
            filename = f"{row['uid']}.{image.extension}"
            record = odvg_record(row, filename)
            members.append((f"{row['uid']}.json", json.dumps(record, sort_keys=True).encode()))
            if not self.config.label_only_tars:
                members.append((filename, image.data))
        return sorted(members)

    def _stats(
        self, collected: _Collected, table: pa.Table, errors: pa.Table, job: dict, seconds: float
    ) -> dict[str, Any]:
        images = collected.images
        reasons = Counter(errors.column("reason").to_pylist())
        return {
            "images": len(images),
            "images_written": table.num_rows,
            "images_without_phrases": sum(1 for i in images if not i.phrases),
            "images_without_boxes": sum(1 for i in images if not i.boxes),
            "boxes": sum(len(i.boxes) for i in images),
            "errors": errors.num_rows,
            "error_reasons": dict(sorted(reasons.items())),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(images) / seconds, 3) if seconds > 0 else None,
            "teacher": self.teacher.teacher_id,
            "config_hash": self.config_hash,
            "created_at": job["created_at"],
            "round": self.config.round,
            "label_only_tars": self.config.label_only_tars,
        }


def _error_order(row: dict[str, Any]) -> tuple:
    return (row["uid"] or "", row["reason"], row["detail"] or "")


# ------------------------------------------------------------------------------------------- writing


def _write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    with storage.atomic_writer(fs, path) as handle:
        pq.write_table(table, handle)


def _write_tar(
    fs: fsspec.AbstractFileSystem, path: str, members: Sequence[tuple[str, bytes]], created_at: str
) -> None:
    """A tar whose bytes depend only on ``members`` and ``created_at`` (fixed headers, given order)."""
    mtime = int(_dt.datetime.fromisoformat(created_at).timestamp())
    with (
        storage.atomic_writer(fs, path) as handle,
        tarfile.open(fileobj=handle, mode="w|", format=tarfile.GNU_FORMAT) as tar,
    ):
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, _TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------- drivers


def pending_label_shards(root: str, teacher: str, **storage_options: Any) -> list[str]:
    """Shards with a phrase-stage ledger entry and no ``label-<teacher>`` entry, sorted."""
    shards = Ledger(root, "phrases", **storage_options).units()
    return Ledger(root, label_stage(teacher), **storage_options).pending(shards)


def label_shards_inprocess(
    root: str, shards: Sequence[str], label_shard: Callable[[str, str], dict[str, Any]] | LabelShard
) -> list[dict]:
    """Label ``shards`` one after another in this process (the Ray executor is ``pipeline.graph``);
    returns their ledger entries."""
    if isinstance(label_shard, LabelShard):
        label_shard.prepare(root)
    return [label_shard(root, shard) for shard in shards]
