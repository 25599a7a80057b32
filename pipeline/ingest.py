"""The ingest stage: incremental ingestion of caption crawls with img2dataset, exactly the new work, once,
crash-safe.

A crawl (any fsspec URL, ``IngestConfig.crawl``) holds partitions: ``<name>.parquet``, ``.csv`` or ``.jsonl``
(optionally ``.gz``) files of (url, caption) rows. The stage's units (``ingest_units``), run in this order on
the driver, are those without an ``ingest`` ledger entry among:

1. units whose plan was written by an earlier run that did not finish (resumed);
2. with ``retry_failed``, one retry unit ``<partition>.retry-<n>`` per partition with unresolved failures;
3. every crawl partition, in name order.

Planning a unit fixes its input once and for all. Its URLs are deduplicated (within the partition and against
every URL already claimed: the seen-sets of committed units plus the plans of unfinished ones), screened
(``pipeline.netguard``: only http/https; hosts must resolve to public addresses unless allow-listed) and
written to ``Layout.ingest_plan(unit)`` (``download.parquet``, ``refused.parquet``, then ``plan.json`` last).
Because the plan is persisted, a re-run after a crash hands img2dataset byte-identical input and its
incremental mode redoes only the shards without a ``_stats.json``; every uid then ends up in exactly one shard.

A unit's work (``IngestWorker``): img2dataset writes the image shards ``Layout.image_shard(<unit>/NNNNN, ...)``
(tar, parquet, ``_stats.json``); evaluation-set copies are removed (``pipeline.decontam``); the uid seen-set
``Layout.ingest_seen(unit)`` is written. A unit whose shards did not all finish raises (the executor retries
it; img2dataset resumes). The executor then commits the unit: its error table (every URL refused, failed or
lost, with the url and caption a retry needs), its ledger entry (which lists the unit's shards: the phrase
stage's units), and last the plan is removed.

The download workers fetch through ``pipeline.netguard.guarded_opener``, and die with the driver.
"""

from __future__ import annotations

import ctypes
import io
import logging
import math
import multiprocessing
import os
import signal
import struct
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pipeline import decontam, images, seen, storage
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.netguard import AddressPolicy, guarded_opener, screen_urls
from pipeline.schema import ERROR_SCHEMA, UnitOutput, validate

# albumentations (imported by img2dataset) asks PyPI for updates at import unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from img2dataset.distributor import ray_distributor, retrier  # noqa: E402
from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.reader import Reader  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from img2dataset.writer import WebDatasetSampleWriter  # noqa: E402

log = logging.getLogger(__name__)

STAGE = "ingest"  # the stage table's row: the ledger of ingest's own units, read for retries
RETRY_MARK = ".retry-"
PARTITION_FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
}
PLAN_COLUMNS = ("uid", "url", "caption")
SUCCESS = "success"
REFUSED = "refused"
LOST = "lost"
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
DISTRIBUTORS = ("multiprocessing", "ray")
# img2dataset's shard names have this many digits (its oom_shard_count).
SHARD_DIGITS = 5


@dataclass(frozen=True)
class IngestConfig:
    """Everything an ingest run can be told. Defaults keep original pixels (``resize_mode="no"``):
    pseudo-label boxes are in original image coordinates.

    ``crawl``: fsspec URL of the folder of crawl partitions (or of one partition file). ``allow_hosts``:
    entries ``host``, ``host:port``, ``ip``, ``ip:port``, ``[v6]:port`` or a CIDR
    (``10.0.0.0/8``) whose non-public addresses may still be fetched. ``eval_sets``: fsspec URLs of image
    folders, COCO jsons or webdataset shards whose copies are dropped (see ``pipeline.decontam``).
    """

    crawl: str | None = None
    url_col: str = "url"
    caption_col: str = "caption"
    number_sample_per_shard: int = 10_000
    processes_count: int = field(default_factory=lambda: os.cpu_count() or 1)
    thread_count: int = 64
    distributor: str = "multiprocessing"
    timeout: float = 10.0
    retries: int = 1
    max_shard_retry: int = 1
    resize_mode: str = "no"
    image_size: int = 256
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    skip_reencode: bool = True
    min_image_size: int = 10
    max_image_pixels: int = images.MAX_IMAGE_PIXELS
    max_aspect_ratio: float = float("inf")
    extract_exif: bool = False
    user_agent_token: str | None = "glip-engine"
    allow_hosts: tuple[str, ...] = ()
    eval_sets: tuple[str, ...] = ()
    phash_threshold: int = decontam.DEFAULT_PHASH_THRESHOLD
    min_correlation: float = decontam.DEFAULT_MIN_CORRELATION
    retry_failed: bool = False
    resolver_threads: int = 32

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"distributor {self.distributor!r} is not one of {DISTRIBUTORS}")
        if self.encode_format not in ("jpg", "png", "webp"):
            raise ValueError(f"encode_format {self.encode_format!r} is not jpg, png or webp")
        self.match_rule()
        if min(self.number_sample_per_shard, self.processes_count, self.thread_count) < 1:
            raise ValueError("number_sample_per_shard, processes_count and thread_count must be positive")
        AddressPolicy.parse(self.allow_hosts)

    def match_rule(self) -> decontam.MatchRule:
        return decontam.MatchRule(self.phash_threshold, self.min_correlation)


def _die_with_parent(parent_pid: int) -> None:
    """Make this process die with its parent: a SIGKILLed driver must not leave workers writing shards that
    the next run writes too."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


class _GuardedDownloader(Downloader):
    """img2dataset's Downloader with the guarded opener installed in the worker process that runs it.

    ``install_opener`` is process-wide: in a Ray worker it also applies to other urllib users of that worker.
    """

    def __init__(
        self, *, address_policy: AddressPolicy, parent_pid: int | None, root_options: _RootOptions, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.address_policy = address_policy
        self.parent_pid = parent_pid
        self.root_options = root_options

    def download_shard(self, row) -> None:
        if self.parent_pid is not None:
            _die_with_parent(self.parent_pid)
        urllib.request.install_opener(guarded_opener(self.address_policy))
        with _fsspec_defaults(self.root_options):
            super().download_shard(row)


# The root's protocol and its storage options (``Layout.storage_options``), as ``_fsspec_defaults`` takes them.
_RootOptions = tuple[str, dict[str, Any]]


def _root_options(layout: Layout) -> _RootOptions:
    return fsspec.core.split_protocol(layout.url)[0] or "file", dict(layout.storage_options)


@contextmanager
def _fsspec_defaults(root_options: _RootOptions) -> Iterator[None]:
    """Make a root's storage options fsspec's defaults for its protocol while the block runs (then restore them).

    img2dataset opens every path it is given with fsspec and no options; without this, an ``s3://`` root
    named with ``--storage-option endpoint_url=...`` (and credentials) would be read and written at S3's
    default endpoint with the default credentials. Options passed explicitly still win (``fsspec.config``).
    """
    protocol, options = root_options
    if not options:
        yield
        return
    conf = fsspec.config.conf
    saved = conf.get(protocol)
    conf[protocol] = {**(saved or {}), **options}
    try:
        yield
    finally:
        if saved is None:
            conf.pop(protocol, None)
        else:
            conf[protocol] = saved


# ----------------------------------------------------------------------------------------------------------
# Image checks before img2dataset's resizer


def checked_image_bytes(data: bytes, max_pixels: int) -> tuple[bytes | None, str | None]:
    """``(bytes to hand to the resizer, None)`` or ``(None, reason)``.

    Rejects what does not identify as an image, what is truncated or corrupt (OpenCV decodes a truncated JPEG
    into a grey-padded picture without complaint) and what has more than ``max_pixels`` pixels (read from the
    header, before anything is decoded). 16-bit images (OpenCV would saturate them to 8 bits) and CMYK JPEGs
    become 8-bit PNGs so the resizer encodes them correctly.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            too_large = images.size_problem(width, height, max_pixels)
            if too_large is not None:
                return None, too_large
            # At 1/8 scale a JPEG decodes much faster yet still reads every byte, so truncation still shows.
            image.draft(None, (max(1, width // 8), max(1, height // 8)))
            image.load()
            mode, image_format = image.mode, image.format
    except UnidentifiedImageError:
        return None, "not an image (unidentified format)"
    except Image.DecompressionBombError as error:
        return None, f"image too large: {error}"
    except _DECODE_ERRORS as error:
        return None, f"corrupt or truncated image: {error}"
    sixteen_bit = image_format == "PNG" and len(data) > 24 and data[24] == 16
    if sixteen_bit or mode == "CMYK":
        return _as_8bit_png(data)
    return data, None


# What PIL raises on malformed files: an exception escaping the resizer would make img2dataset drop the row.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError, struct.error)


def _as_8bit_png(data: bytes) -> tuple[bytes | None, str | None]:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        return None, "corrupt image: OpenCV cannot decode it"
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    return cv2.imencode(".png", pixels)[1].tobytes(), None


class _CheckedResizer(Resizer):
    """img2dataset's Resizer behind ``checked_image_bytes``."""

    def __init__(self, *, max_image_pixels: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_image_pixels = max_image_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        data, reason = checked_image_bytes(img_stream.read(), self.max_image_pixels)
        if reason is not None:
            return None, None, None, None, None, reason
        return super().__call__(io.BytesIO(data), blurring_bbox_list)


# ----------------------------------------------------------------------------------------------------------
# Partitions


@dataclass(frozen=True)
class Partition:
    """One crawl file. ``name`` is the file name without its format suffix; ``url`` an fsspec URL."""

    name: str
    url: str
    format: str


def _split_suffix(file_name: str) -> tuple[str, str] | None:
    for suffix in sorted(PARTITION_FORMATS, key=len, reverse=True):
        if file_name.endswith(suffix) and len(file_name) > len(suffix):
            return file_name[: -len(suffix)], PARTITION_FORMATS[suffix]
    return None


def find_partitions(crawl: str) -> list[Partition]:
    """The partitions of a crawl root (a folder, or one partition file), sorted by name."""
    fs, path = storage.filesystem(crawl)
    files = [path] if fs.isfile(path) else [storage.join(path, n) for n in storage.list_names(fs, path)]
    partitions: dict[str, Partition] = {}
    for file in files:
        split = _split_suffix(file.rsplit("/", 1)[-1])
        if split is None:
            continue
        name, file_format = split
        if RETRY_MARK in name or "/" in name:
            raise ValueError(f"partition name {name!r} may not contain {RETRY_MARK!r}")
        if name in partitions:
            raise ValueError(f"two crawl files give partition {name!r}: {partitions[name].url} and {file}")
        partitions[name] = Partition(name, storage.url_of(fs, file), file_format)
    return [partitions[name] for name in sorted(partitions)]


def read_partition(partition: Partition, url_col: str, caption_col: str) -> tuple[list, list]:
    """``(urls, captions)`` of a partition, as Python lists of ``str | None``."""
    fs, path = storage.filesystem(partition.url)
    if partition.format == "parquet":
        table = pq.read_table(path, filesystem=fs)
    else:
        with fs.open(path, "rb", compression="infer") as handle:
            if partition.format == "csv":
                text_columns = {url_col: pa.string(), caption_col: pa.string()}
                table = pa_csv.read_csv(
                    handle, convert_options=pa_csv.ConvertOptions(column_types=text_columns)
                )
            else:
                table = pa_json.read_json(handle)
    missing = [c for c in (url_col, caption_col) if c not in table.column_names]
    if missing:
        raise ValueError(f"{partition.url}: no column {missing}; columns are {table.column_names}")
    captions = [None if c is None else str(c) for c in table.column(caption_col).to_pylist()]
    return [None if u is None else str(u) for u in table.column(url_col).to_pylist()], captions


# ----------------------------------------------------------------------------------------------------------
# Plans


@dataclass
class Plan:
    """A unit's fixed input: rows to download (``PLAN_COLUMNS``) and rows refused before download (with
    ``reason`` and ``detail``), with planning counts."""

    unit: str
    source: str
    download: pa.Table
    refused: pa.Table
    counts: dict[str, int]
    # Fixed with the plan: img2dataset's incremental mode only resumes correctly with the same shard size.
    shard_size: int

    def uids(self) -> np.ndarray:
        """``uint64[N]``: every uid this plan claims (downloaded or refused)."""
        values = self.download.column("uid").to_pylist() + self.refused.column("uid").to_pylist()
        return seen.hex_to_uids(values)


def _plan_table(uids: list[str], urls: list, captions: list) -> pa.Table:
    return pa.table({"uid": uids, "url": urls, "caption": captions}, schema=_PLAN_SCHEMA)


_PLAN_SCHEMA = pa.schema([(name, pa.string()) for name in PLAN_COLUMNS])


def _mask(values) -> pa.Array:
    """A pyarrow boolean filter (an empty Python list would otherwise become a null-typed array)."""
    return pa.array(np.asarray(values, dtype=bool), pa.bool_())


def _error_rows(rows: pa.Table, reasons: Sequence[str], details: Sequence[str | None]) -> list[dict]:
    """Error rows (``pipeline.schema.ERROR_SCHEMA``) of ``rows`` (uid, url, caption), one reason and detail
    each."""
    return [
        {**row, "reason": reason, "detail": detail}
        for row, reason, detail in zip(rows.select(list(PLAN_COLUMNS)).to_pylist(), reasons, details)
    ]


def build_plan(unit: str, source: str, rows: pa.Table, claimed: seen.SeenSet, config: IngestConfig) -> Plan:
    """Dedup and screen ``rows`` (``PLAN_COLUMNS``) into the plan of ``unit``.

    Drops repeated uids within ``rows`` (first kept) and uids already in ``claimed``; refused rows keep their
    reason (every row without a URL is one). Row order is preserved, so the plan is a deterministic function
    of its inputs.
    """
    uids = seen.hex_to_uids(rows.column("uid").to_pylist())
    # Rows without a URL all share the uid of "": each is refused with its own error row, never taken for a
    # duplicate of another one, nor for one seen before.
    blank = np.array([not (url or "").strip() for url in rows.column("url").to_pylist()], dtype=bool)
    first = seen.first_occurrences(uids) | blank
    known = claimed.contains(uids) & first & ~blank
    keep = first & ~known
    candidates = rows.filter(_mask(keep))
    policy = AddressPolicy.parse(config.allow_hosts)
    reasons = screen_urls(candidates.column("url").to_pylist(), policy, config.resolver_threads)
    ok = np.array([reason is None for reason in reasons], dtype=bool)
    details = [reason for reason in reasons if reason is not None]
    refused = candidates.filter(_mask(~ok))
    refused = refused.append_column("reason", pa.array([REFUSED] * refused.num_rows, pa.string()))
    refused = refused.append_column("detail", pa.array(details, pa.string()))
    counts = {
        "rows": rows.num_rows,
        "duplicate_in_partition": int((~first).sum()),
        "seen_before": int(known.sum()),
        REFUSED: refused.num_rows,
        "to_download": int(ok.sum()),
    }
    return Plan(unit, source, candidates.filter(_mask(ok)), refused, counts, config.number_sample_per_shard)


def write_plan(layout: Layout, plan: Plan) -> None:
    """Persist ``plan``; ``plan.json`` is written last and marks the plan complete."""
    for name, table in (("download.parquet", plan.download), ("refused.parquet", plan.refused)):
        storage.write_parquet(layout.fs, layout.ingest_plan(plan.unit, name), table)
    meta = {"unit": plan.unit, "source": plan.source, "counts": plan.counts, "shard_size": plan.shard_size}
    storage.write_json(layout.fs, layout.ingest_plan(plan.unit, "plan.json"), meta)


def read_plan(layout: Layout, unit: str) -> Plan | None:
    """The persisted plan of ``unit``, or None when there is no complete one."""
    if not layout.fs.exists(layout.ingest_plan(unit, "plan.json")):
        return None
    meta = storage.read_json(layout.fs, layout.ingest_plan(unit, "plan.json"))
    tables = [
        storage.read_parquet(layout.fs, layout.ingest_plan(unit, name))
        for name in ("download.parquet", "refused.parquet")
    ]
    return Plan(unit, meta["source"], tables[0], tables[1], meta["counts"], meta["shard_size"])


def planned_units(layout: Layout) -> list[str]:
    """Units with a complete plan (committed or not), sorted."""
    names = storage.list_names(layout.fs, layout.ingest_plans())
    return [unit for unit in names if layout.fs.exists(layout.ingest_plan(unit, "plan.json"))]


# ----------------------------------------------------------------------------------------------------------
# Download, decontamination and commit


def _finished_shards(fs: fsspec.AbstractFileSystem, folder: str) -> list[int]:
    """Shard ids that img2dataset finished (its ``_stats.json`` is written at the end of a shard)."""
    return sorted(int(name.split("_")[0]) for name in storage.list_names(fs, folder, "_stats.json"))


def _download(layout: Layout, plan: Plan, config: IngestConfig) -> None:
    """Run img2dataset on the plan's ``download.parquet`` into the unit's image folder (incremental mode)."""
    folder = layout.image_folder(plan.unit)
    layout.fs.makedirs(storage.join(folder, "_tmp"), exist_ok=True)
    root_options = _root_options(layout)
    with _fsspec_defaults(root_options):  # img2dataset's reader opens the plan and writes its _tmp files here
        reader = Reader(
            layout.url_of(layout.ingest_plan(plan.unit, "download.parquet")),
            "parquet",
            "url",
            "caption",
            None,
            None,
            ["uid"],
            plan.shard_size,
            set(_finished_shards(layout.fs, folder)),
            layout.url_of(storage.join(folder, "_tmp")),
        )
        output = layout.url_of(folder)
        downloader = _make_downloader(output, reader.column_list, plan.shard_size, config, root_options)
        distribute = _process_pool_distributor if config.distributor == "multiprocessing" else ray_distributor
        distribute(config.processes_count, downloader, reader, 1000, config.max_shard_retry)
    temporary = storage.join(folder, "_tmp")
    if layout.fs.exists(temporary):  # an object store has no empty folders: img2dataset may have left nothing
        layout.fs.rm(temporary, recursive=True)


def _process_pool_distributor(
    processes_count: int, downloader: Callable, reader: Iterable, _subjob_size: int, max_shard_retry: int
) -> None:
    """img2dataset's multiprocessing distributor on a ``ProcessPoolExecutor`` (spawned workers).

    img2dataset's own distributor ends with ``multiprocessing.Pool.terminate()``; in a process that had run Ray
    before, terminating (or garbage-collecting) the pool deadlocked on the task queue's lock. The executor's
    shutdown joins its workers without that lock.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes_count, mp_context=context) as pool:

        def run(shards: Iterable) -> list:
            futures = [pool.submit(downloader, shard) for shard in shards]
            return [row for future in as_completed(futures) for ok, row in [future.result()] if ok is False]

        retrier(run, run(reader), max_shard_retry)


def _make_downloader(
    output_folder: str,
    column_list: list[str],
    shard_size: int,
    config: IngestConfig,
    root_options: _RootOptions,
) -> _GuardedDownloader:
    resizer = _CheckedResizer(
        max_image_pixels=config.max_image_pixels,
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_quality=config.encode_quality,
        encode_format=config.encode_format,
        skip_reencode=config.skip_reencode,
        min_image_size=config.min_image_size,
        max_image_area=config.max_image_pixels,
        max_aspect_ratio=config.max_aspect_ratio,
    )
    return _GuardedDownloader(
        address_policy=AddressPolicy.parse(config.allow_hosts),
        parent_pid=os.getpid() if config.distributor == "multiprocessing" else None,
        root_options=root_options,
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=config.thread_count,
        save_caption=True,
        extract_exif=config.extract_exif,
        output_folder=output_folder,
        column_list=column_list,
        timeout=config.timeout,
        number_sample_per_shard=shard_size,
        oom_shard_count=SHARD_DIGITS,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=config.encode_format,
        retries=config.retries,
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
    )


def _shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def _read_shard_rows(layout: Layout, unit: str, shards: list[str]) -> pa.Table:
    """uid, url, caption, status and error_message of every row of the unit's shard parquets."""
    columns = [*PLAN_COLUMNS, "status", "error_message"]
    tables = [pa.schema([(name, pa.string()) for name in columns]).empty_table()]
    for shard in shards:
        table = storage.read_parquet(layout.fs, layout.image_shard(f"{unit}/{shard}", ".parquet"), columns)
        tables.append(table.cast(tables[0].schema))
    return pa.concat_tables(tables)


def _lost_rows(plan: Plan, rows: pa.Table) -> pa.Table:
    """Planned rows that no shard parquet mentions (img2dataset skips a row when a sample raises inside its
    loop), so that every planned URL is accounted for and can be retried."""
    written = seen.SeenSet([seen.hex_to_uids(rows.column("uid").to_pylist())])
    missing = ~written.contains(seen.hex_to_uids(plan.download.column("uid").to_pylist()))
    lost = plan.download.filter(_mask(missing))
    if lost.num_rows:
        log.warning("unit %s: img2dataset wrote no row for %d URLs", plan.unit, lost.num_rows)
    return lost


class IncompleteUnit(RuntimeError):
    """img2dataset did not finish every shard of a unit; running the unit again resumes it."""


def _recorded_config(config: IngestConfig) -> dict:
    keep = (
        "resize_mode",
        "image_size",
        "encode_format",
        "encode_quality",
        "skip_reencode",
        "min_image_size",
        "max_image_pixels",
        "timeout",
        "retries",
        "allow_hosts",
        "eval_sets",
        "phash_threshold",
        "min_correlation",
    )
    values = asdict(config)
    return {key: (list(values[key]) if isinstance(values[key], tuple) else values[key]) for key in keep}


# ----------------------------------------------------------------------------------------------------------
# The stage: units and worker


class IngestWorker:
    """The ingest stage's worker: plans (unless a plan exists), downloads, decontaminates one unit per call.

    It lives for a whole run on the driver: the claimed-uid set and the evaluation index are loaded once and
    the claimed set grows with every plan written, so later units never re-claim an earlier unit's URLs.
    """

    def __init__(self, config: IngestConfig | None = None) -> None:
        self.config = config or IngestConfig()
        self._claimed: seen.SeenSet | None = None
        self._eval_index: decontam.EvalIndex | None = None

    def __call__(self, layout: Layout, unit: str) -> UnitOutput:
        started = time.monotonic()
        plan = read_plan(layout, unit)
        if plan is None:
            plan = self._plan(layout, unit)
        if plan.download.num_rows:
            _download(layout, plan, self.config)
        expected = math.ceil(plan.download.num_rows / plan.shard_size)
        shards = [_shard_name(i) for i in _finished_shards(layout.fs, layout.image_folder(unit))]
        if len(shards) < expected:
            raise IncompleteUnit(f"unit {unit}: {len(shards)} of {expected} shards finished")
        self._decontaminate(layout, [f"{unit}/{shard}" for shard in shards])
        seen.write_uids(layout.fs, layout.ingest_seen(unit), plan.uids())
        output = _unit_output(layout, plan, shards, self.config, time.monotonic() - started)
        log.info("unit %s ingested: %s", unit, output.stats["counts"])
        return output

    def after_commit(self, layout: Layout, unit: str) -> None:
        """The ledger entry is written: the plan is no longer needed."""
        layout.fs.rm(layout.ingest_plan(unit), recursive=True)

    def _plan(self, layout: Layout, unit: str) -> Plan:
        if RETRY_MARK in unit:
            group = unit.split(RETRY_MARK)[0]
            rows = unresolved_failures(layout, _committed_groups(layout).get(group, [])).select(
                list(PLAN_COLUMNS)
            )
            # A retry unit's uids are claimed by the units that failed them: only its own repeats are dropped.
            plan = build_plan(unit, f"retry of {group}", rows, seen.SeenSet(), self.config)
        else:
            partition = _partition(self.config, unit)
            plan = build_plan(unit, partition.url, _partition_rows(partition, self.config), self._claimed_set(layout),
                              self.config)  # fmt: skip
        write_plan(layout, plan)
        self._claimed_set(layout).add(plan.uids())
        return plan

    def _claimed_set(self, layout: Layout) -> seen.SeenSet:
        """uids of committed units plus those of plans not yet committed (their URLs are already taken)."""
        if self._claimed is None:
            committed = Ledger(layout, STAGE).units()
            self._claimed = seen.SeenSet.load(layout.fs, [layout.ingest_seen(unit) for unit in committed])
            for unit in set(planned_units(layout)) - set(committed):
                self._claimed.add(read_plan(layout, unit).uids())
        return self._claimed

    def _decontaminate(self, layout: Layout, shards: list[str]) -> None:
        if not self.config.eval_sets or not shards:
            return
        if self._eval_index is None:
            self._eval_index = decontam.build_eval_index(self.config.eval_sets)
        index, rule = self._eval_index, self.config.match_rule()
        with ThreadPoolExecutor(max(1, self.config.processes_count)) as pool:
            list(pool.map(lambda shard: decontam.decontaminate_shard(layout, shard, index, rule), shards))


def _unit_output(
    layout: Layout, plan: Plan, shards: list[str], config: IngestConfig, seconds: float
) -> UnitOutput:
    """The unit's error rows (failed downloads, lost rows, refused URLs) and its ledger entry."""
    rows = _read_shard_rows(layout, plan.unit, shards)
    statuses = rows.column("status").to_pylist()
    failed = rows.filter(_mask([status not in (SUCCESS, decontam.DECONTAMINATED) for status in statuses]))
    lost = _lost_rows(plan, rows)
    refused = plan.refused
    errors = [
        *_error_rows(failed, failed.column("status").to_pylist(), failed.column("error_message").to_pylist()),
        *_error_rows(lost, [LOST] * lost.num_rows, ["img2dataset wrote no row for this URL"] * lost.num_rows),
        *_error_rows(refused, refused.column("reason").to_pylist(), refused.column("detail").to_pylist()),
    ]
    counts = {SUCCESS: 0, **plan.counts, **Counter(statuses), "failed": failed.num_rows + lost.num_rows}
    if lost.num_rows:
        counts[LOST] = lost.num_rows
    entry = {
        "source": plan.source,
        "retry_of": plan.unit.split(RETRY_MARK)[0] if RETRY_MARK in plan.unit else None,
        "shards": [f"{plan.unit}/{shard}" for shard in shards],
        "shard_size": plan.shard_size,
        "counts": counts,
        "reasons": dict(Counter(error["detail"] for error in errors).most_common(20)),
        "stats": {
            "duration_s": round(seconds, 3),
            "images_per_s": round(len(statuses) / max(seconds, 1e-6), 2),
        },
        "seen": layout.relative(layout.ingest_seen(plan.unit)),
        "config": _recorded_config(config),
    }
    return UnitOutput(entry, errors)


def _partition(config: IngestConfig, name: str) -> Partition:
    matches = [partition for partition in find_partitions(_crawl(config)) if partition.name == name]
    if not matches:
        raise FileNotFoundError(f"no crawl partition {name!r} under {config.crawl}")
    return matches[0]


def _crawl(config: IngestConfig | None) -> str:
    if config is None or not config.crawl:
        raise ValueError(
            "the ingest stage needs IngestConfig.crawl: the fsspec URL of the crawl's partitions"
        )
    return config.crawl


def _partition_rows(partition: Partition, config: IngestConfig) -> pa.Table:
    urls, captions = read_partition(partition, config.url_col, config.caption_col)
    uids = seen.uids_to_hex(seen.url_uids(u or "" for u in urls))
    return _plan_table(uids, urls, captions)


def unresolved_failures(layout: Layout, units: Sequence[str]) -> pa.Table:
    """Error rows of ``units`` (committed, in attempt order) that no later unit of the list attempted again."""
    current = ERROR_SCHEMA.empty_table()
    for unit in units:
        if current.num_rows:
            retried = seen.SeenSet([seen.read_uids(layout.fs, layout.ingest_seen(unit))])
            still = ~retried.contains(seen.hex_to_uids(current.column("uid").to_pylist()))
            current = current.filter(_mask(still))
        table = storage.read_parquet(layout.fs, layout.errors(STAGE, unit))
        validate(table, ERROR_SCHEMA)
        current = pa.concat_tables([current, table])
    return current


def _retry_index(unit: str) -> int:
    return int(unit.split(RETRY_MARK)[1]) if RETRY_MARK in unit else 0


def _committed_groups(layout: Layout) -> dict[str, list[str]]:
    """Committed units per partition (the partition, then its retries), in attempt order."""
    groups: dict[str, list[str]] = {}
    for unit in sorted(Ledger(layout, STAGE).units(), key=_retry_index):
        groups.setdefault(unit.split(RETRY_MARK)[0], []).append(unit)
    return groups


def ingest_units(layout: Layout, config: IngestConfig | None, upstream: None = None) -> list[str]:
    """The ingest stage's units in run order: unfinished plans, then (``retry_failed``) one retry unit per
    partition with unresolved failures, then every crawl partition (the stage table drops the committed)."""
    units = list(planned_units(layout))
    if config is not None and config.retry_failed:
        for group, committed in sorted(_committed_groups(layout).items()):
            if unresolved_failures(layout, committed).num_rows:
                units.append(f"{group}{RETRY_MARK}{_retry_index(committed[-1]) + 1}")
    units += [partition.name for partition in find_partitions(_crawl(config))]
    return list(dict.fromkeys(units))
