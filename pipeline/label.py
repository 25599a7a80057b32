"""The label stage: a teacher GLIP grounds each image shard's caption phrases; filtered boxes become a
pseudo-label shard.

Per image shard ``<partition>/<NNNNN>`` (inputs: the shard's tar + parquet from ingest and its phrase table),
``LabelShard`` writes ``Layout.label_shard(teacher, shard, suffix)``:

- ``.parquet``: one row per labelled image, ``pipeline.schema.LABEL_SCHEMA``, sorted by uid;
- ``.tar``: per image ``<uid>.jpg`` (the original bytes, never re-encoded; the source member's
  extension is kept) and ``<uid>.json`` (its ODVG grounding record plus provenance), in the image shard's
  key order (the order the stage reads it in); with ``label_only_tars`` only the json;

each atomically, and returns the shard's stats and error rows for inputs that could not be labelled (see
``REASONS``), which the executor commits: the error table, then, last, the ledger entry of stage
``label-<teacher>`` (unit = shard). Output bytes are a function of the inputs, the teacher and the config
only: rows are sorted by uid, tar members follow the image shard's sorted keys, tar headers are fixed, and
``created_at`` is the labeling job's, read from ``Layout.label_job(teacher)`` (written once, by
``prepare_job``), so a re-run after a crash rewrites identical files; and images are read in key order
(``in_key_order``), so a shard that img2dataset wrote in another order (it writes images as their downloads
finish) gets the same batches, hence the same boxes.
A group of images becomes its rows, and its tar samples are written, as soon as its boxes are in, while the
teacher runs the next batches: the shard's end only sorts the rows and writes the parquet. (Made there, the
records and the tar kept a GPU idle ~0.7 ms an image of 100 boxes on this project's 2-core Xeon, and the images'
bytes waited in memory for the whole shard.)

Filters (pure functions over one image's ``PhraseBox`` list) run in this order: the floor score, minimum box
side, NMS (``per_phrase`` as mmdetection's pseudo-label tool, ``global`` across phrases as GRIT, or ``none``),
then a cap on boxes per image. Labels are made once per teacher at a low floor (0.3) and reused by every round
and threshold: the keep-threshold (GLIP's Cap24M kept boxes scoring > 0.5) is applied where labels are read
(``pipeline.exports.keep_above``). Greedy NMS never lets a lower-scoring box suppress a higher one, so NMS at
the floor and then a threshold keeps exactly the boxes that thresholding first and NMS after would.

No Ray here: the stage table (``pipeline.graph``) runs ``label_worker(settings)`` inside actors or in this
process.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from torchvision.ops import batched_nms, nms

from glip.config import config_digest
from glip.prompts import Prompt
from pipeline import images, storage, tars
from pipeline.layout import Layout
from pipeline.schema import (
    LABEL_SCHEMA,
    PHRASE_TABLE_SCHEMA,
    SCHEMA_VERSION,
    UnitOutput,
    odvg_record,
    validate,
)
from teacher.teacher import NAME_PATTERN, PhraseBox, Teacher, TeacherConfig, box_order, teacher_id_of

logger = logging.getLogger(__name__)

STAGE_PREFIX = "label"
NMS_MODES = ("per_phrase", "global", "none")
DECODE_MODES = ("auto", "thread", "inline")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
REASONS = {
    "undecodable_image": "the image bytes do not decode (truncated, corrupt, not an image)",
    "image_too_large": "the image header claims more than pipeline.images.MAX_IMAGE_PIXELS (never decoded)",
    "missing_image": "a successful ingest row whose image is not in the tar",
    "unknown_tar_member": "an image in the tar with no successful ingest row",
    "duplicate_image": "a second image for a uid already seen in the shard",
    "missing_phrases": "no row in the phrase table for the uid",
    "bad_prompt": "the phrase spans do not fit the caption or a phrase exceeds the token limit",
    "tar_read_error": "the tar is truncated or corrupt from this point on",
    "unsafe_member_name": "a tar member named with an absolute path, '..' or a backslash (never read)",
    "duplicate_member": "a second member of one suffix for one sample key",
    "non_regular_member": "a tar member that is a link (symbolic or hard), a device or a fifo (never followed)",
}


@dataclass(frozen=True)
class LabelConfig:
    """Settings of the label stage.

    Attributes:
        floor_score: write boxes scoring strictly above this; the keep-threshold is chosen where labels are
            read (GLIP Cap24M kept > 0.5, GRIT > 0.65), so one labeling serves every threshold above the floor.
        nms: ``per_phrase`` (boxes of one phrase suppress each other), ``global`` (any box suppresses any
            other, as GRIT) or ``none``.
        nms_iou: IoU above which NMS suppresses.
        min_box_size: boxes narrower or lower than this many pixels are dropped (zero-area ones always are).
        max_boxes_per_image: the highest-scoring boxes kept per image.
        drop_images_without_boxes: leave images with no surviving box out of the outputs (GRIT discarded
            them); they are counted either way.
        batch_size: images handed to the teacher at once (it splits them into its own forward batches).
        prefetch_images: decoded images queued ahead of inference by the decoding thread.
        decode: ``thread`` (a thread decodes while the teacher runs), ``inline`` (the teacher's thread decodes
            between forward passes) or ``auto``: a thread when the teacher is on an accelerator, inline on
            CPU, where the forward passes use every core and a decoding thread only takes them (and the GIL:
            measured on 2 cores, the model ran 3.7% slower beside the thread, which saved less than that).
            The labels are the same either way.
        decode_workers: with ``thread``, images decode in a pool of this many threads (in order; PIL and
            numpy release the GIL while they work): one core decodes ~90 noisy 1333x800 JPEGs a second
            (README), fewer than a GPU labels.
        label_only_tars: tars carry only the json records, aligned with the image shards.
        teacher: output folder / ledger name; default the teacher's ``teacher_id``.
    """

    floor_score: float = 0.3
    nms: str = "per_phrase"
    nms_iou: float = 0.5
    min_box_size: float = 0.0
    max_boxes_per_image: int = 100
    drop_images_without_boxes: bool = False
    batch_size: int = 16
    prefetch_images: int = 64
    decode: str = "auto"
    decode_workers: int = 4
    label_only_tars: bool = False
    teacher: str | None = None

    def __post_init__(self) -> None:
        if self.nms not in NMS_MODES:
            raise ValueError(f"LabelConfig.nms {self.nms!r} is not one of {NMS_MODES}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"LabelConfig.decode {self.decode!r} is not one of {DECODE_MODES}")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"LabelConfig.nms_iou must be in [0, 1], got {self.nms_iou}")
        for name in ("max_boxes_per_image", "batch_size", "prefetch_images", "decode_workers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LabelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.min_box_size < 0:
            raise ValueError(f"LabelConfig.min_box_size must be >= 0, got {self.min_box_size}")
        if self.teacher is not None and not NAME_PATTERN.match(self.teacher):
            raise ValueError(f"LabelConfig.teacher {self.teacher!r}: use letters, digits, '.', '_' and '-'")

    def digest_fields(self) -> dict[str, Any]:
        """The settings that change output content (not prefetching or decoding, not the folder name)."""
        values = dataclasses.asdict(self)
        values.pop("prefetch_images")
        values.pop("decode")
        values.pop("decode_workers")
        values.pop("teacher")
        return values


@dataclass(frozen=True)
class LabelSettings:
    """Everything a label run is told: how to build the teacher and the stage's own settings."""

    teacher: TeacherConfig
    label: LabelConfig = field(default_factory=LabelConfig)

    @functools.cached_property
    def folder(self) -> str:
        """The teacher's output folder and ledger key: ``label.teacher``, else the teacher's ``teacher_id``
        (computed from the checkpoint file without loading the model; read once, a GLIP-L file is 1.7 GB)."""
        return self.label.teacher or teacher_id_of(self.teacher)


def ledger_stage(settings: LabelSettings) -> str:
    """The ledger stage of a label run: ``label-<teacher folder>``."""
    return label_stage(settings.folder)


def label_worker(settings: LabelSettings) -> LabelShard:
    """The label stage's worker: loads the teacher (once per actor) and wraps it in a ``LabelShard``."""
    return LabelShard(Teacher.from_checkpoint(settings.teacher), settings.label)


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
    ordered = sorted(boxes, key=box_order)
    if mode == "none" or len(ordered) < 2:
        return ordered
    # Through numpy: torch.tensor of Python lists took most of this function's time (100 boxes an image).
    coordinates = torch.from_numpy(np.array([b.box for b in ordered], dtype=np.float32))  # [N, 4] xyxy
    scores = torch.from_numpy(np.array([b.score for b in ordered], dtype=np.float32))
    if mode == "global":
        keep = nms(coordinates, scores, iou)
    else:
        phrases = torch.from_numpy(np.array([b.phrase for b in ordered], dtype=np.int64))
        keep = batched_nms(coordinates, scores, phrases, iou)
    return [ordered[i] for i in sorted(keep.tolist())]


def top_k(boxes: Sequence[PhraseBox], k: int) -> list[PhraseBox]:
    """The ``k`` highest-scoring boxes (ties broken by phrase, then coordinates)."""
    return sorted(boxes, key=box_order)[:k]


def filter_boxes(boxes: Sequence[PhraseBox], config: LabelConfig) -> list[PhraseBox]:
    """Floor, minimum size, NMS, cap: the boxes of one image that become pseudo-labels."""
    kept = above_threshold(boxes, config.floor_score)
    kept = large_enough(kept, config.min_box_size)
    kept = suppress(kept, config.nms, config.nms_iou)
    return top_k(kept, config.max_boxes_per_image)


# ---------------------------------------------------------------------------------------------- job file


def label_stage(teacher: str) -> str:
    """The ledger stage of a teacher's labels."""
    return f"{STAGE_PREFIX}-{teacher}"


def prepare_job(
    layout: Layout, teacher: str, teacher_id: str | None = None, config_hash: str | None = None
) -> dict:
    """Read ``Layout.label_job(teacher)``, writing it first if absent; returns it.

    Its ``created_at`` is stamped on every row of the job, so that reruns and resumed runs write identical
    files. Call it once on the driver, before shards go to workers, with the folder name only (workers that
    all find the file absent at once would each stamp their own time); each ``LabelShard`` then calls it
    with its ``teacher_id`` and ``config_hash``, which are added to the file on first use and must match
    afterwards (ValueError otherwise: one folder never mixes teachers or configs).
    """
    fs, path = layout.fs, layout.label_job(teacher)
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
    """``rows``: ingest row (uid, url, sha256) per tar key; ``phrases``: (caption, phrases) per uid;
    ``tokens``: the token count of each caption with phrases (``Teacher.token_counts``, filled in by the
    stage)."""

    rows: dict[str, dict[str, Any]]
    phrases: dict[str, tuple[str, list[dict[str, Any]]]]
    tokens: dict[str, int] = {}


class _Decoded(NamedTuple):
    """One tar image: ``image`` (``H x W x 3`` uint8 BGR, what the teacher takes without converting) None
    with ``reason`` and ``error`` set when it does not decode (or is too large to); ``key`` None for a problem
    of the tar itself (``reason`` and ``error`` say what)."""

    key: str | None
    extension: str
    data: bytes
    image: np.ndarray | None
    reason: str | None
    error: str | None


def _read_inputs(layout: Layout, shard: str) -> _ShardInputs:
    columns = ["key", "uid", "url", "sha256", "status"]
    images = storage.read_parquet(layout.fs, layout.image_shard(shard, ".parquet"), columns)
    images = images.filter(pc.equal(images.column("status"), "success"))
    rows = {r["key"]: r for r in images.select(["key", "uid", "url", "sha256"]).to_pylist()}
    path = layout.phrase_table(shard)
    phrase_table = storage.read_parquet(layout.fs, path)
    validate(phrase_table, PHRASE_TABLE_SCHEMA, where=path)  # a table of another version is not guessed at
    phrases = {r["uid"]: (r["caption"], r["phrases"] or []) for r in phrase_table.to_pylist()}
    return _ShardInputs(rows, phrases)


def _tar_images(layout: Layout, shard: str, workers: int = 1) -> Iterator[_Decoded]:
    """The image of every sample of the shard's tar, decoded (the first image suffix of a sample), and the
    tar's problems (``pipeline.tars``), in key order (``in_key_order``); ``workers`` > 1 decodes in a pool
    of that many threads, at most ``2 * workers`` images ahead of the consumer."""
    table = storage.read_parquet(layout.fs, layout.image_shard(shard, ".parquet"), ["key", "status"])
    keys = table.filter(pc.equal(table.column("status"), "success")).column("key").to_pylist()
    samples = tars.iter_samples(layout.fs, layout.image_shard(shard, ".tar"))
    samples = (item for item in samples if isinstance(item, tars.TarProblem) or _image_suffix(item))
    samples = in_key_order(samples, keys)
    if workers <= 1:
        yield from (_decoded_sample(item) for item in samples)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="label-decode") as pool:
        ahead: deque = deque()
        for item in samples:
            ahead.append(pool.submit(_decoded_sample, item))
            if len(ahead) >= 2 * workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def in_key_order(samples: Iterable[Any], keys: Iterable[str]) -> Iterator[Any]:
    """``samples`` (dicts with ``__key__``; anything else, e.g. a ``tars.TarProblem``, passes at once) in the
    sorted order of ``keys``, each as soon as every smaller key has passed.

    img2dataset writes a shard's images in the order their downloads finish, which differs between two ingests
    of one crawl; the label stage batches images in the order it reads them, and a batch's padding changes its
    images' boxes, so reading in key order makes the labels of a shard the same however it was written. Out of
    order samples wait in memory (a few, as downloads finish nearly in order); a key that never comes (a
    member missing from the tar) keeps the rest waiting until the tar ends, when they pass in key order.
    Samples of other keys pass at once, and a key's later samples right after its first (the stage makes
    error rows of both kinds)."""
    expected = sorted(set(keys))
    known = set(expected)
    position = 0
    waiting: dict[str, list[Any]] = {}  # key -> its samples in tar order, until every smaller key passed
    passed: set[str] = set()
    for sample in samples:
        key = sample.get("__key__") if isinstance(sample, dict) else None
        if key not in known or key in passed:
            yield sample
            continue
        waiting.setdefault(key, []).append(sample)
        while position < len(expected) and expected[position] in waiting:
            passed.add(expected[position])
            yield from waiting.pop(expected[position])
            position += 1
    for key in sorted(waiting):
        yield from waiting[key]


def _image_suffix(sample: dict) -> str | None:
    """The sample's first image suffix (samples without one are not images, and are skipped)."""
    return next((suffix for suffix in sorted(sample) if suffix in IMAGE_EXTENSIONS), None)


def _decoded_sample(item: dict | tars.TarProblem) -> _Decoded:
    if isinstance(item, tars.TarProblem):
        return _Decoded(None, "", b"", None, item.reason, item.detail)
    extension = _image_suffix(item)
    return _Decoded(item["__key__"], extension, item[extension], *images.decode_bgr(item[extension]))


def decode_image(data: bytes) -> tuple[Image.Image | None, str | None]:
    """``(RGB image, None)`` or ``(None, what went wrong)`` for bytes that do not decode completely, or whose
    header claims more than ``pipeline.images.MAX_IMAGE_PIXELS`` pixels (refused before decoding)."""
    decoded = images.decode_rgb(data)
    return decoded.image, decoded.detail


def decode_bgr(data: bytes) -> tuple[np.ndarray | None, str | None]:
    """``decode_image`` as the ``H x W x 3`` uint8 BGR array the teacher takes without converting (made in the
    decoding threads, not the teacher's; ``pipeline.images.decode_bgr``)."""
    decoded = images.decode_bgr(data)
    return decoded.array, decoded.detail


class Background:
    """Iterate ``items`` in a thread that starts at once, at most ``maxsize`` ahead of the consumer (decoding
    overlaps reading the shard's tables and inference: PIL releases the GIL while decoding, torch while
    computing). An exception in the thread is re-raised in the consumer; ``close`` (or leaving the ``with``
    block) stops the thread, iterated or not."""

    _FINISHED = object()

    def __init__(self, items: Iterator[Any], maxsize: int) -> None:
        self._buffer: queue.Queue = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), name="label-decode", daemon=True)
        self._thread.start()

    def _produce(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not _put(self._buffer, item, self._stop):
                    return
        except Exception as error:  # handed over to the consumer, which re-raises it
            _put(self._buffer, _Failure(error), self._stop)
            return
        _put(self._buffer, self._FINISHED, self._stop)

    def __iter__(self) -> Iterator[Any]:
        while (item := self._buffer.get()) is not self._FINISHED:
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Inline:
    """``Background``'s interface without the thread: items are made as the consumer asks for them."""

    def __init__(self, items: Iterator[Any]) -> None:
        self._items = items

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __enter__(self) -> Inline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def in_background(items: Iterator[Any], maxsize: int) -> Iterator[Any]:
    """``Background`` as a generator: the thread starts at the first ``next`` and stops when the generator
    is exhausted or closed."""
    with Background(items, maxsize) as background:
        yield from background


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
    box_count: int = 0  # of the filtered boxes, kept once they are in its row (``boxes`` is then emptied)


@dataclass
class _Collected:
    """What a shard's labelling has gathered: its images (admitted, in reading order), error rows, uids seen;
    and the output made as the images finish: ``finished`` images wait to become rows; ``parts``: the label
    table's rows made so far, a table per lot; ``tar``: where each row's sample goes as soon as it is made."""

    shard: str
    created_at: str
    tar: tars.SampleWriter
    images: list[_Image] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    finished: list[_Image] = field(default_factory=list)
    parts: list[pa.Table] = field(default_factory=list)

    def error(self, uid: str | None, reason: str, detail: str | None = None) -> None:
        self.errors.append({"uid": uid, "reason": reason, "detail": detail})


class _InFlight:
    """Batches submitted to the teacher and not collected yet, oldest first: at most ``teacher.in_flight``
    (2 on a GPU: the next forward pass runs while the CPU post-processes the last batch and goes on with the
    shard; 1 elsewhere: each batch is collected as soon as it is submitted)."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher
        self.depth = max(1, int(getattr(teacher, "in_flight", 1)))
        self.queue: deque = deque()

    def submit(
        self, images: list, prompts: list[Prompt], done: Callable[[list[list[PhraseBox]]], None]
    ) -> None:
        """Submit a forward batch; ``done`` gets its boxes when it is collected (here or later)."""
        self.queue.append((self.teacher.submit(images, prompts), done))
        while len(self.queue) >= self.depth:
            self.collect_oldest()

    def collect_oldest(self) -> None:
        pending, done = self.queue.popleft()
        done(self.teacher.collect(pending))

    def drain(self) -> None:
        while self.queue:
            self.collect_oldest()


class _Batches:
    """(image, prompt) pairs waiting for a forward pass, by ``teacher.batch_key``, submitted
    ``teacher.batch_size`` at a time as soon as that many of one key wait, so the first forward pass starts
    while later images still decode.

    A teacher without buckets has one key (None): the last, smaller batch of each group goes at the group's end
    (``flush_group``), so the forward batches are the ones ``Teacher.label_prompts`` makes of the whole group
    and the boxes are the same (they depend on their batch neighbours). A bucketed teacher (compiled or CUDA
    graphs) fills every batch to ``batch_size`` with copies, and its boxes do not depend on their neighbours:
    its keys (padded size, prompt length) wait across groups until a batch is full, and only the shard's end
    submits smaller ones (``flush``). Flushed per group, a crawl of mixed aspect ratios would send each group's
    few pairs of every size as a batch filled with copies: the demo world's 800 crawl images (9 padded sizes
    at GLIP-T's input rule) took 332 forward passes of 16 that way and take 54 so (bench/RESULTS.md, session
    16). At most ``batch_size - 1`` decoded images a key wait."""

    def __init__(self, teacher: Teacher, in_flight: _InFlight) -> None:
        self.teacher = teacher
        self.in_flight = in_flight
        self.waiting: dict[Any, list[tuple[_Group, int, np.ndarray, Prompt]]] = {}  # first seen first

    def add(self, group: _Group, slot: int, decoded: np.ndarray, prompt: Prompt) -> None:
        key = self.teacher.batch_key(decoded, prompt)
        waiting = self.waiting.setdefault(key, [])
        waiting.append((group, slot, decoded, prompt))
        group.outstanding += 1
        if len(waiting) >= self.teacher.batch_size:
            self._submit(key, self.teacher.batch_size)

    def flush_group(self) -> None:
        """A group's end: submit the unbucketed key's smaller batch (bucketed keys wait on)."""
        if self.waiting.get(None):
            self._submit(None, len(self.waiting[None]))

    def flush(self) -> None:
        """The shard's end: submit what still waits (a last, smaller batch of each key)."""
        for key, waiting in self.waiting.items():
            if waiting:
                self._submit(key, len(waiting))

    def _submit(self, key: Any, count: int) -> None:
        batch, self.waiting[key] = self.waiting[key][:count], self.waiting[key][count:]
        self.in_flight.submit(
            [pair[2] for pair in batch], [pair[3] for pair in batch], functools.partial(_store, batch)
        )


def _sorted_table(parts: list[pa.Table]) -> pa.Table:
    """The label table of a shard from its parts: one chunk, rows in uid order, checked (``validate``)."""
    if parts:
        table = pa.concat_tables(parts).sort_by("uid").combine_chunks()
    else:
        table = LABEL_SCHEMA.empty_table()
    validate(table)
    return table


def _store(batch: list[tuple[_Group, int, np.ndarray, Prompt]], found: list[list[PhraseBox]]) -> None:
    for (group, slot, _, _), boxes in zip(batch, found, strict=True):
        group.boxes[slot].extend(boxes)
        group.outstanding -= 1


class _Group:
    """``LabelConfig.batch_size`` images with prompts on their way through the teacher (their pairs go through
    ``_Batches``), and the images without prompts read among them; done when every pair's boxes are in, then
    filtered."""

    def __init__(self) -> None:
        self.images: list[_Image] = []
        self.boxes: list[list[PhraseBox]] = []
        self.outstanding = 0  # pairs whose boxes are not in yet
        self.prompted = 0  # images with prompts: the group's size

    def __len__(self) -> int:
        return self.prompted

    @property
    def done(self) -> bool:
        return not self.outstanding

    def add(self, image: _Image, decoded: np.ndarray, prompts: list[Prompt], batches: _Batches) -> None:
        slot = len(self.images)
        self.images.append(image)
        self.boxes.append([])
        self.prompted += bool(prompts)
        for prompt in prompts:
            batches.add(self, slot, decoded, prompt)

    def labelled(self) -> list[tuple[_Image, list[PhraseBox]]]:
        """Every image with its boxes in ``box_order`` (once ``done``)."""
        return [(image, sorted(boxes, key=box_order)) for image, boxes in zip(self.images, self.boxes)]


class LabelShard:
    """The label stage for one image shard, holding a teacher (a Ray actor runs one of these).

    Args:
        teacher: the ``Teacher`` (any object with ``teacher_id``, ``config_hash``, ``batch_size``, ``device``,
            ``token_counts``, ``prompts``, ``batch_key``, ``submit``, ``collect`` and ``in_flight`` as
            ``teacher.Teacher``).
        config: the stage settings.
    """

    def __init__(self, teacher: Teacher, config: LabelConfig | None = None) -> None:
        self.teacher = teacher
        self.config = config or LabelConfig()
        self.name = self.config.teacher or teacher.teacher_id
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f"teacher name {self.name!r}: use letters, digits, '.', '_' and '-'")
        payload = {"teacher": teacher.config_hash, "label": self.config.digest_fields()}
        self.config_hash = config_digest(payload)

    @property
    def stage(self) -> str:
        return label_stage(self.name)

    def prepare(self, layout: Layout) -> dict:
        """``prepare_job`` for this teacher and config (once per run, before any shard)."""
        return prepare_job(layout, self.name, self.teacher.teacher_id, self.config_hash)

    def __call__(self, layout: Layout, shard: str) -> UnitOutput:
        """Label shard ``<partition>/<NNNNN>``; returns its stats and error rows."""
        started = time.perf_counter()
        job = self.prepare(layout)
        mtime = _dt.datetime.fromisoformat(job["created_at"]).timestamp()
        tar_path = layout.label_shard(self.name, shard, ".tar")
        with tars.writing_samples(layout.fs, tar_path, mtime) as tar, self._decoded(layout, shard) as decoded:
            collected = _Collected(shard, job["created_at"], tar)
            inputs = self._with_token_counts(_read_inputs(layout, shard))  # any decoding thread has started
            self._collect(decoded, inputs, collected)
        table = _sorted_table(collected.parts)
        storage.write_parquet(layout.fs, layout.label_shard(self.name, shard, ".parquet"), table)
        stats = self._stats(collected, table, job, time.perf_counter() - started)
        logger.info(
            "label %s/%s: %d images, %d boxes, %d errors in %.1fs",
            self.name,
            shard,
            stats["images"],
            stats["boxes"],
            stats["errors"],
            stats["seconds"],
        )
        return UnitOutput(stats, collected.errors)

    def _decoded(self, layout: Layout, shard: str) -> Background | Inline:
        decode = self.config.decode
        if decode == "auto":
            decode = "inline" if torch.device(self.teacher.device).type == "cpu" else "thread"
        if decode == "inline":
            return Inline(_tar_images(layout, shard))
        return Background(_tar_images(layout, shard, self.config.decode_workers), self.config.prefetch_images)

    def _with_token_counts(self, inputs: _ShardInputs) -> _ShardInputs:
        """One batched tokenizer call for the shard's captions, not one per image."""
        uids = [uid for uid, (_, phrases) in inputs.phrases.items() if phrases]
        counts = self.teacher.token_counts([inputs.phrases[uid][0] for uid in uids])
        return inputs._replace(tokens=dict(zip(uids, counts, strict=True)))

    def _collect(self, decoded_images: Background, inputs: _ShardInputs, collected: _Collected) -> None:
        """Label every decoded image; each group's rows are made and its tar samples written as soon as its
        boxes are in, while the teacher runs the next batches (``_emit``), not at the shard's end with the
        device idle. Images without prompts ride in the group they were read in (not counted in its size, so
        the forward batches are the ones ``Teacher.label_prompts`` makes), so samples go out in reading order."""
        in_flight = _InFlight(self.teacher)
        batches = _Batches(self.teacher, in_flight)
        groups: deque[_Group] = deque([_Group()])
        for decoded in decoded_images:
            item = self._admit(decoded, inputs, collected)
            if item is not None:
                groups[-1].add(*item, batches)
            if len(groups[-1]) >= self.config.batch_size:
                batches.flush_group()
                groups.append(_Group())
            while groups[0].done and len(groups) > 1:  # filtered and written out as soon as its boxes are in
                self._finish(groups.popleft(), collected)
        batches.flush()
        in_flight.drain()
        for group in groups:
            self._finish(group, collected)
        for key, row in inputs.rows.items():
            if row["uid"] not in collected.seen:
                collected.error(row["uid"], "missing_image", f"tar key {key}")

    def _finish(self, group: _Group, collected: _Collected) -> None:
        for image, boxes in group.labelled():
            image.boxes = filter_boxes(boxes, self.config)
            collected.finished.append(image)
        self._emit(collected)

    def _emit(self, collected: _Collected) -> None:
        """The finished images as a part of the label table (LABEL_SCHEMA) and as tar samples, written now: the
        json record made from that table's values so that the two agree (float32 boxes), the image's original
        bytes beside it unless ``label_only_tars``; their boxes and bytes are then let go."""
        images, collected.finished = collected.finished, []
        for image in images:
            image.box_count = len(image.boxes)
        kept = [i for i in images if i.boxes or not self.config.drop_images_without_boxes]
        if kept:
            part = self._table(kept, collected.shard, collected.created_at)
            for image, row in zip(kept, part.to_pylist(), strict=True):
                filename = f"{row['uid']}.{image.extension}"
                record = json.dumps(odvg_record(row, filename), sort_keys=True).encode()
                sample = {"__key__": row["uid"], "json": record}
                if not self.config.label_only_tars:
                    sample[image.extension] = image.data
                collected.tar.write(sample)
            collected.parts.append(part)
        for image in images:
            image.boxes, image.data = [], b""

    def _admit(
        self, decoded: _Decoded, inputs: _ShardInputs, collected: _Collected
    ) -> tuple[_Image, np.ndarray, list] | None:
        """Check one decoded tar image; returns what to label, or None (error recorded, or no phrases)."""
        if decoded.key is None:
            collected.error(None, decoded.reason, decoded.error)
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
            collected.error(uid, decoded.reason, decoded.error)
            return None
        if uid not in inputs.phrases:
            collected.error(uid, "missing_phrases")
            return None
        caption, phrases = inputs.phrases[uid]
        height, width = decoded.image.shape[:2]
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
            spans = [(p["start"], p["end"]) for p in phrases]
            prompts = self.teacher.prompts(caption, spans, inputs.tokens.get(uid))
        except ValueError as error:
            collected.error(uid, "bad_prompt", str(error))
            return None
        collected.images.append(image)
        return image, decoded.image, prompts

    def _table(self, images: list[_Image], shard: str, created_at: str) -> pa.Table:
        rows = [self._row(image, shard, created_at) for image in images]
        return pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)

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
            "config_hash": self.config_hash,
            "created_at": created_at,
        }

    def _stats(self, collected: _Collected, table: pa.Table, job: dict, seconds: float) -> dict[str, Any]:
        images = collected.images
        reasons = Counter(error["reason"] for error in collected.errors)
        return {
            "images": len(images),
            "images_written": table.num_rows,
            "images_without_phrases": sum(1 for i in images if not i.phrases),
            "images_without_boxes": sum(1 for i in images if not i.box_count),
            "boxes": sum(i.box_count for i in images),
            "errors": len(collected.errors),
            "error_reasons": dict(sorted(reasons.items())),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(images) / seconds, 3) if seconds > 0 else None,
            "teacher": self.teacher.teacher_id,
            "config_hash": self.config_hash,
            "created_at": job["created_at"],
            "floor_score": self.config.floor_score,
            "label_only_tars": self.config.label_only_tars,
        }
