"""Incremental ingestion of caption crawls with img2dataset: exactly the new work, once, crash-safe.

A crawl root (any fsspec URL) holds partitions: ``<name>.parquet``, ``.csv`` or ``.jsonl`` (optionally
``.gz``) files of (url, caption) rows. A run ingests the units that have no ``ingest`` ledger entry:

1. resume units whose plan was written by an earlier run that did not finish;
2. with ``retry_failed``, one retry unit ``<partition>.retry-<n>`` per partition with unresolved failures;
3. every crawl partition without a ledger entry, in name order.

Planning a unit fixes its input once and for all. Its URLs are deduplicated (within the partition and against
every URL already claimed: the seen-sets of committed units plus the plans of unfinished ones), screened (only
http/https; hosts must resolve to public addresses unless allow-listed) and written to
``<root>/ingest/plan/<unit>/`` (``download.parquet``, ``refused.parquet``, then ``plan.json`` last). Because
the plan is persisted, a re-run after a crash hands img2dataset byte-identical input and its incremental mode
redoes only the shards without a ``_stats.json``; every uid then ends up in exactly one shard.

Committing a unit: img2dataset writes ``<root>/images/<unit>/NNNNN.{tar,parquet}`` and ``NNNNN_stats.json``;
evaluation-set copies are removed (``pipeline.decontam``); the failures table
``<root>/ingest/failures/<unit>.parquet`` (uid, url, caption, status, error_message) and the uid seen-set
``<root>/ingest/seen/<unit>.npy`` are written; then the ledger entry, last.

Network safety: the driver resolves every host (``getaddrinfo``) before img2dataset sees a URL. Inside the
download workers urllib gets an opener (``guarded_opener``) that checks every connection, redirects included,
twice: the resolved addresses before connecting, and the peer actually connected to before sending a request
(a DNS answer may change in between). Its redirects are limited to http/https and it ignores proxy settings.
"""

from __future__ import annotations

import ctypes
import http.client
import io
import ipaddress
import logging
import math
import multiprocessing
import os
import signal
import socket
import struct
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline import decontam, seen, storage
from pipeline.ledger import Ledger

# albumentations (imported by img2dataset) asks PyPI for updates at import unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from img2dataset.distributor import ray_distributor, retrier  # noqa: E402
from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.reader import Reader  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from img2dataset.writer import WebDatasetSampleWriter  # noqa: E402

log = logging.getLogger(__name__)

STAGE = "ingest"
RETRY_MARK = ".retry-"
PARTITION_FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
}
PLAN_COLUMNS = ("uid", "url", "caption")
FAILURE_COLUMNS = ("uid", "url", "caption", "status", "error_message")
SUCCESS = "success"
REFUSED = "refused"
LOST = "lost"
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
DISTRIBUTORS = ("multiprocessing", "ray")
# img2dataset's shard names have this many digits (its oom_shard_count).
SHARD_DIGITS = 5


@dataclass(frozen=True)
class IngestConfig:
    """Everything a run of ``run_ingest`` can be told. Defaults keep original pixels (``resize_mode="no"``):
    pseudo-label boxes are in original image coordinates.

    ``allow_hosts``: entries ``host``, ``host:port``, ``ip``, ``ip:port``, ``[v6]:port`` or a CIDR
    (``10.0.0.0/8``) whose non-public addresses may still be fetched. ``eval_sets``: fsspec URLs of image
    folders, COCO jsons or webdataset shards whose copies are dropped (see ``pipeline.decontam``).
    """

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
    max_image_pixels: int = 89_478_485
    max_aspect_ratio: float = float("inf")
    extract_exif: bool = False
    user_agent_token: str | None = "glip-engine"
    allow_hosts: tuple[str, ...] = ()
    eval_sets: tuple[str, ...] = ()
    phash_threshold: int = decontam.DEFAULT_PHASH_THRESHOLD
    min_correlation: float = decontam.DEFAULT_MIN_CORRELATION
    retry_failed: bool = False
    resolver_threads: int = 32
    show_progress: bool = True

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


# ----------------------------------------------------------------------------------------------------------
# Address policy


@dataclass(frozen=True)
class _AllowEntry:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    host: str | None
    port: int | None


def _parse_allow_entry(text: str) -> _AllowEntry:
    entry, port = text.strip(), None
    if entry.startswith("["):
        address, _, rest = entry[1:].partition("]")
        entry, port = address, (int(rest[1:]) if rest.startswith(":") else None)
    elif entry.count(":") == 1:
        entry, port_text = entry.split(":")
        port = int(port_text)
    try:
        return _AllowEntry(ipaddress.ip_network(entry, strict=False), None, port)
    except ValueError:
        if not entry or "/" in entry:
            raise ValueError(f"allow-hosts entry {text!r} is not a host, host:port or CIDR") from None
        return _AllowEntry(None, entry.lower(), port)


def _non_public_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is not a public unicast address, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-global"


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses may be fetched: public unicast ones, plus the allow-listed entries."""

    allowed: tuple[_AllowEntry, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AddressPolicy:
        return cls(tuple(_parse_allow_entry(entry) for entry in entries if entry.strip()))

    def _allows(self, host: str, port: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        for entry in self.allowed:
            if entry.port is not None and entry.port != port:
                continue
            if entry.host is not None and entry.host == host.lower():
                return True
            if entry.network is not None and address.version == entry.network.version:
                if address in entry.network:
                    return True
        return False

    def refusal(self, host: str, port: int, addresses: Sequence[str]) -> str | None:
        """Why fetching ``host:port`` resolved to ``addresses`` is refused, or None when it is allowed."""
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            kind = _non_public_kind(address)
            if kind is not None and not self._allows(host, port, address):
                return f"refused {kind} address {address} for {host}:{port}"
        return None


def _resolve(host: str) -> tuple[str, ...] | str:
    """The addresses ``host`` resolves to, or the resolver's error message."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as error:
        return f"dns: {error}"
    return tuple(sorted({info[4][0] for info in infos}))


def screen_urls(
    urls: Sequence[str | None], policy: AddressPolicy, resolver_threads: int = 32
) -> list[str | None]:
    """For each URL, why it will not be fetched (scheme, malformed, DNS failure, refused address) or None.

    Each distinct host is resolved once, ``resolver_threads`` at a time.
    """
    parsed: list[tuple[str, int] | str] = [_host_and_port(url) for url in urls]
    hosts = sorted({item[0] for item in parsed if isinstance(item, tuple)})
    with ThreadPoolExecutor(max(1, resolver_threads)) as pool:
        resolved = dict(zip(hosts, pool.map(_resolve, hosts)))
    reasons: list[str | None] = []
    for item in parsed:
        if isinstance(item, str):
            reasons.append(item)
            continue
        addresses = resolved[item[0]]
        reasons.append(addresses if isinstance(addresses, str) else policy.refusal(*item, addresses))
    return reasons


def _host_and_port(url: str | None) -> tuple[str, int] | str:
    """``(host, port)`` of an http(s) URL, or why the URL is not fetchable."""
    if not url:
        return "invalid url: empty"
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        return f"invalid url: {error}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"scheme not allowed: {parts.scheme or 'none'}"
    if not parts.hostname:
        return "invalid url: no host"
    return parts.hostname, port or (443 if parts.scheme.lower() == "https" else 80)


# ----------------------------------------------------------------------------------------------------------
# Guarded urllib, installed inside img2dataset's download workers


def _check_before_connect(connection: http.client.HTTPConnection, policy: AddressPolicy) -> None:
    """Refuse before any packet reaches a forbidden address (e.g. a redirect to an internal service)."""
    addresses = _resolve(connection.host)
    if isinstance(addresses, str):
        raise OSError(addresses)
    reason = policy.refusal(connection.host, connection.port, addresses)
    if reason is not None:
        raise ConnectionRefusedError(reason)


def _check_peer(connection: http.client.HTTPConnection, policy: AddressPolicy) -> None:
    """Refuse a connection whose peer the policy forbids (DNS answers may change between check and connect),
    before any request byte is sent."""
    address = connection.sock.getpeername()[0]
    reason = policy.refusal(connection.host, connection.port, (address,))
    if reason is not None:
        connection.close()
        raise ConnectionRefusedError(reason)


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, policy: AddressPolicy, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy

    def connect(self) -> None:
        _check_before_connect(self, self.policy)
        super().connect()
        _check_peer(self, self.policy)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, policy: AddressPolicy, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy

    def connect(self) -> None:
        _check_before_connect(self, self.policy)
        super().connect()
        _check_peer(self, self.policy)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        self.policy = policy

    def http_open(self, req: urllib.request.Request):
        return self.do_open(_GuardedHTTPConnection, req, policy=self.policy)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        self.policy = policy

    def https_open(self, req: urllib.request.Request):
        return self.do_open(_GuardedHTTPSConnection, req, context=self._context, policy=self.policy)


class _HttpOnlyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; a crawl must only ever fetch http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https", ""):
            raise urllib.error.HTTPError(newurl, code, f"redirect to scheme {scheme!r} refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def guarded_opener(policy: AddressPolicy) -> urllib.request.OpenerDirector:
    """A urllib opener that only connects to addresses ``policy`` allows, follows only http(s) redirects and
    ignores proxy environment variables (a proxy's address would hide the target's)."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        _GuardedHTTPHandler(policy),
        _GuardedHTTPSHandler(policy),
        _HttpOnlyRedirectHandler(),
    )


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

    def __init__(self, *, address_policy: AddressPolicy, parent_pid: int | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.address_policy = address_policy
        self.parent_pid = parent_pid

    def download_shard(self, row) -> None:
        if self.parent_pid is not None:
            _die_with_parent(self.parent_pid)
        urllib.request.install_opener(guarded_opener(self.address_policy))
        super().download_shard(row)


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
            if width * height > max_pixels:
                return None, f"image too large: {width}x{height} pixels"
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
        partitions[name] = Partition(name, _url(fs, file), file_format)
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


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """An fsspec path back to a URL img2dataset's own fsspec calls resolve the same way."""
    return path if storage.is_local(fs) else fs.unstrip_protocol(path)


# ----------------------------------------------------------------------------------------------------------
# Output layout and plans


class Layout:
    """Where ingest keeps things under an output root (see the module docstring)."""

    def __init__(self, root: str) -> None:
        if "://" not in root:
            root = os.path.abspath(root)
        self.fs, self.root = storage.filesystem(root)

    def images(self, unit: str) -> str:
        return storage.join(self.root, "images", unit)

    def plan(self, unit: str, name: str = "") -> str:
        return storage.join(self.root, "ingest", "plan", unit, name)

    def seen(self, unit: str) -> str:
        return storage.join(self.root, "ingest", "seen", f"{unit}.npy")

    def failures(self, unit: str) -> str:
        return storage.join(self.root, "ingest", "failures", f"{unit}.parquet")

    def relative(self, path: str) -> str:
        return path[len(self.root) :].lstrip("/")

    def url(self, path: str) -> str:
        return _url(self.fs, path)


@dataclass
class Plan:
    """A unit's fixed input: rows to download and rows refused before download, with planning counts."""

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
_FAILURE_SCHEMA = pa.schema([(name, pa.string()) for name in FAILURE_COLUMNS])


def _mask(values) -> pa.Array:
    """A pyarrow boolean filter (an empty Python list would otherwise become a null-typed array)."""
    return pa.array(np.asarray(values, dtype=bool), pa.bool_())


def _failure_rows(plan_rows: pa.Table, status: str, messages: list[str]) -> pa.Table:
    """``plan_rows`` (``PLAN_COLUMNS``) with a ``status`` and one error message per row appended."""
    statuses = pa.array([status] * plan_rows.num_rows, pa.string())
    return plan_rows.append_column("status", statuses).append_column(
        "error_message", pa.array(messages, pa.string())
    )


def build_plan(unit: str, source: str, rows: pa.Table, claimed: seen.SeenSet, config: IngestConfig) -> Plan:
    """Dedup and screen ``rows`` (``PLAN_COLUMNS``) into the plan of ``unit``.

    Drops repeated uids within ``rows`` (first kept) and uids already in ``claimed``; refused rows keep their
    reason. Row order is preserved, so the plan is a deterministic function of its inputs.
    """
    uids = seen.hex_to_uids(rows.column("uid").to_pylist())
    first = seen.first_occurrences(uids)
    known = claimed.contains(uids) & first
    keep = first & ~known
    candidates = rows.filter(_mask(keep))
    policy = AddressPolicy.parse(config.allow_hosts)
    reasons = screen_urls(candidates.column("url").to_pylist(), policy, config.resolver_threads)
    ok = np.array([reason is None for reason in reasons], dtype=bool)
    refused_reasons = [reason for reason in reasons if reason is not None]
    refused = _failure_rows(candidates.filter(_mask(~ok)), REFUSED, refused_reasons)
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
        with storage.atomic_writer(layout.fs, layout.plan(plan.unit, name)) as handle:
            pq.write_table(table, handle)
    meta = {"unit": plan.unit, "source": plan.source, "counts": plan.counts, "shard_size": plan.shard_size}
    storage.write_json(layout.fs, layout.plan(plan.unit, "plan.json"), meta)


def read_plan(layout: Layout, unit: str) -> Plan | None:
    """The persisted plan of ``unit``, or None when there is no complete one."""
    if not layout.fs.exists(layout.plan(unit, "plan.json")):
        return None
    meta = storage.read_json(layout.fs, layout.plan(unit, "plan.json"))
    tables = [
        pq.read_table(layout.plan(unit, n), filesystem=layout.fs)
        for n in ("download.parquet", "refused.parquet")
    ]
    return Plan(unit, meta["source"], tables[0], tables[1], meta["counts"], meta["shard_size"])


def planned_units(layout: Layout) -> list[str]:
    """Units with a complete plan (committed or not), sorted."""
    folder = storage.join(layout.root, "ingest", "plan")
    return [u for u in storage.list_names(layout.fs, folder) if layout.fs.exists(layout.plan(u, "plan.json"))]


# ----------------------------------------------------------------------------------------------------------
# Download, decontamination and commit


def _finished_shards(fs: fsspec.AbstractFileSystem, folder: str) -> list[int]:
    """Shard ids that img2dataset finished (its ``_stats.json`` is written at the end of a shard)."""
    return sorted(int(name.split("_")[0]) for name in storage.list_names(fs, folder, "_stats.json"))


def _download(layout: Layout, plan: Plan, config: IngestConfig) -> None:
    """Run img2dataset on the plan's ``download.parquet`` into ``images/<unit>/`` (incremental mode)."""
    folder = layout.images(plan.unit)
    layout.fs.makedirs(storage.join(folder, "_tmp"), exist_ok=True)
    reader = Reader(
        layout.url(layout.plan(plan.unit, "download.parquet")),
        "parquet",
        "url",
        "caption",
        None,
        None,
        ["uid"],
        plan.shard_size,
        set(_finished_shards(layout.fs, folder)),
        layout.url(storage.join(folder, "_tmp")),
    )
    downloader = _make_downloader(layout.url(folder), reader.column_list, plan.shard_size, config)
    distribute = _process_pool_distributor if config.distributor == "multiprocessing" else ray_distributor
    distribute(config.processes_count, downloader, reader, 1000, config.max_shard_retry)
    layout.fs.rm(storage.join(folder, "_tmp"), recursive=True)


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
    output_folder: str, column_list: list[str], shard_size: int, config: IngestConfig
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
    """The failure-table columns of every row of the unit's shard parquets."""
    tables = [_FAILURE_SCHEMA.empty_table()]
    for shard in shards:
        path = storage.join(layout.images(unit), f"{shard}.parquet")
        table = pq.read_table(path, filesystem=layout.fs, columns=list(FAILURE_COLUMNS))
        tables.append(table.cast(_FAILURE_SCHEMA))
    return pa.concat_tables(tables)


def _lost_rows(plan: Plan, rows: pa.Table) -> pa.Table:
    """Failure rows for planned URLs that no shard parquet mentions (img2dataset skips a row when a sample
    raises inside its loop), so that every planned URL is accounted for and can be retried."""
    written = seen.SeenSet([seen.hex_to_uids(rows.column("uid").to_pylist())])
    missing = ~written.contains(seen.hex_to_uids(plan.download.column("uid").to_pylist()))
    lost = plan.download.filter(_mask(missing))
    if lost.num_rows:
        log.warning("unit %s: img2dataset wrote no row for %d URLs", plan.unit, lost.num_rows)
    return _failure_rows(lost, LOST, ["img2dataset wrote no row for this URL"] * lost.num_rows)


@dataclass
class UnitReport:
    """What one unit's ingestion did. ``complete`` is False when some shard never finished."""

    unit: str
    complete: bool
    counts: dict[str, int]
    shards: int
    duration_s: float


@dataclass
class IngestReport:
    """What a run did, unit by unit."""

    units: list[UnitReport] = field(default_factory=list)
    duration_s: float = 0.0

    def totals(self) -> dict[str, int]:
        total: Counter = Counter()
        for unit in self.units:
            total.update(unit.counts)
        return dict(total)

    @property
    def complete(self) -> bool:
        return all(unit.complete for unit in self.units)

    def table(self) -> str:
        """A plain-text summary table, one line per unit and a total line."""
        columns = ("rows", "seen_before", "to_download", SUCCESS, "failed", REFUSED, decontam.DECONTAMINATED)
        lines = [f"{'unit':<28}" + "".join(f"{c:>15}" for c in columns) + f"{'seconds':>10}"]
        named = [
            (u.unit + ("" if u.complete else " (incomplete)"), u.counts, u.duration_s) for u in self.units
        ]
        for name, counts, seconds in [*named, ("total", self.totals(), self.duration_s)]:
            figures = "".join(f"{counts.get(c, 0):>15}" for c in columns)
            lines.append(f"{name:<28}{figures}{seconds:>10.1f}")
        return "\n".join(lines)


class _Run:
    """State of one ``run_ingest`` call: the layout, ledger, and the lazily loaded claimed-uid set and
    evaluation index."""

    def __init__(self, root: str, config: IngestConfig) -> None:
        self.config = config
        self.layout = Layout(root)
        self.ledger = Ledger(self.layout.url(self.layout.root), STAGE)
        self.committed = set(self.ledger.units())
        self._claimed: seen.SeenSet | None = None
        self._eval_index: decontam.EvalIndex | None = None
        self.attempted: set[str] = set()

    def claimed(self) -> seen.SeenSet:
        """uids of committed units plus those of plans not yet committed (their URLs are already taken)."""
        if self._claimed is None:
            paths = [self.layout.seen(u) for u in sorted(self.committed)]
            self._claimed = seen.SeenSet.load(self.layout.fs, paths)
            for unit in self.unfinished_plans():
                self._claimed.add(read_plan(self.layout, unit).uids())
        return self._claimed

    def unfinished_plans(self) -> list[str]:
        """Units planned by an earlier run but not committed. Plans left by a crash right after the ledger
        entry was written are removed."""
        unfinished = []
        for unit in planned_units(self.layout):
            if unit in self.committed:
                self.layout.fs.rm(self.layout.plan(unit), recursive=True)
            else:
                unfinished.append(unit)
        return unfinished

    def eval_index(self) -> decontam.EvalIndex | None:
        if self.config.eval_sets and self._eval_index is None:
            self._eval_index = decontam.build_eval_index(self.config.eval_sets)
        return self._eval_index

    def ingest(self, plan: Plan) -> UnitReport:
        """Download, decontaminate and commit one planned unit."""
        started = time.monotonic()
        self.attempted.add(plan.unit)
        folder = self.layout.images(plan.unit)
        if plan.download.num_rows:
            _download(self.layout, plan, self.config)
        expected = math.ceil(plan.download.num_rows / plan.shard_size)
        shards = [_shard_name(i) for i in _finished_shards(self.layout.fs, folder)]
        if len(shards) < expected:
            log.error("unit %s: %d of %d shards finished; re-run to resume", plan.unit, len(shards), expected)
            return UnitReport(plan.unit, False, dict(plan.counts), len(shards), time.monotonic() - started)
        self._decontaminate(folder, shards)
        counts = self._commit(plan, shards, time.monotonic() - started)
        log.info("unit %s committed: %s", plan.unit, counts)
        return UnitReport(plan.unit, True, counts, len(shards), time.monotonic() - started)

    def _decontaminate(self, folder: str, shards: list[str]) -> None:
        index = self.eval_index()
        if index is None or not shards:
            return
        fs, rule = self.layout.fs, self.config.match_rule()
        with ThreadPoolExecutor(max(1, self.config.processes_count)) as pool:
            list(pool.map(lambda s: decontam.decontaminate_shard(fs, folder, s, index, rule), shards))

    def _commit(self, plan: Plan, shards: list[str], duration_s: float) -> dict[str, int]:
        """Write the unit's failures table and seen-set, then its ledger entry (last); drop the plan."""
        rows = _read_shard_rows(self.layout, plan.unit, shards)
        statuses = rows.column("status").to_pylist()
        failed = _mask([status not in (SUCCESS, decontam.DECONTAMINATED) for status in statuses])
        lost = _lost_rows(plan, rows)
        failures = pa.concat_tables([rows.filter(failed), lost, plan.refused.cast(_FAILURE_SCHEMA)])
        with storage.atomic_writer(self.layout.fs, self.layout.failures(plan.unit)) as handle:
            pq.write_table(failures, handle)
        seen.write_uids(self.layout.fs, self.layout.seen(plan.unit), plan.uids())
        counts = {
            SUCCESS: 0,
            **plan.counts,
            **Counter(statuses),
            "failed": failures.num_rows - plan.refused.num_rows,
        }
        if lost.num_rows:
            counts[LOST] = lost.num_rows
        entry = {
            "source": plan.source,
            "retry_of": plan.unit.split(RETRY_MARK)[0] if RETRY_MARK in plan.unit else None,
            "shards": [f"{plan.unit}/{shard}" for shard in shards],
            "shard_size": plan.shard_size,
            "counts": counts,
            "reasons": dict(Counter(failures.column("error_message").to_pylist()).most_common(20)),
            "stats": {
                "duration_s": round(duration_s, 3),
                "images_per_s": round(len(statuses) / max(duration_s, 1e-6), 2),
            },
            "failures": self.layout.relative(self.layout.failures(plan.unit)),
            "seen": self.layout.relative(self.layout.seen(plan.unit)),
            "config": _recorded_config(self.config),
        }
        self.ledger.record(plan.unit, entry)
        self.committed.add(plan.unit)
        self.layout.fs.rm(self.layout.plan(plan.unit), recursive=True)
        return counts

    def plan_and_ingest(self, unit: str, source: str, rows: Callable[[], pa.Table]) -> UnitReport:
        """Ingest ``unit``, planning it from ``rows()`` first unless an earlier run already did."""
        plan = read_plan(self.layout, unit)
        if plan is None:
            # A retry unit's uids are claimed by the units that failed them: only its own repeats are dropped.
            claimed = seen.SeenSet() if RETRY_MARK in unit else self.claimed()
            plan = build_plan(unit, source, rows(), claimed, self.config)
            write_plan(self.layout, plan)
            self.claimed().add(plan.uids())
        return self.ingest(plan)


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


def _partition_rows(partition: Partition, config: IngestConfig) -> pa.Table:
    urls, captions = read_partition(partition, config.url_col, config.caption_col)
    uids = seen.uids_to_hex(seen.url_uids(u or "" for u in urls))
    return _plan_table(uids, urls, captions)


def unresolved_failures(layout: Layout, units: Sequence[str]) -> pa.Table:
    """Failures of ``units`` (committed, in attempt order) that no later unit of the list attempted again."""
    current = _FAILURE_SCHEMA.empty_table()
    for unit in units:
        if current.num_rows:
            retried = seen.SeenSet([seen.read_uids(layout.fs, layout.seen(unit))])
            still = ~retried.contains(seen.hex_to_uids(current.column("uid").to_pylist()))
            current = current.filter(_mask(still))
        table = pq.read_table(layout.failures(unit), filesystem=layout.fs).cast(_FAILURE_SCHEMA)
        current = pa.concat_tables([current, table])
    return current


def _retry_index(unit: str) -> int:
    return int(unit.split(RETRY_MARK)[1]) if RETRY_MARK in unit else 0


def _retry_units(run: _Run) -> list[tuple[str, pa.Table]]:
    """``(retry unit name, rows)`` for every partition whose committed units left unresolved failures."""
    groups: dict[str, list[str]] = {}
    for unit in sorted(run.committed, key=_retry_index):
        groups.setdefault(unit.split(RETRY_MARK)[0], []).append(unit)
    retries = []
    for group, units in sorted(groups.items()):
        failures = unresolved_failures(run.layout, units)
        if failures.num_rows:
            name = f"{group}{RETRY_MARK}{_retry_index(units[-1]) + 1}"
            retries.append((name, failures.select(list(PLAN_COLUMNS))))
    return retries


def run_ingest(crawl: str, root: str, config: IngestConfig | None = None) -> IngestReport:
    """Ingest every crawl partition of ``crawl`` not yet in the ``ingest`` ledger under ``root``.

    ``crawl``: fsspec URL of a folder of partitions (or one partition file). ``root``: the output root; local
    paths and shared object stores work with both distributors (``memory://`` does not: download workers are
    separate processes). Order: unfinished plans, then (``retry_failed``) retry units, then new partitions.
    Returns a report per unit; a unit whose shards did not all finish is not committed and resumes next run.
    """
    config = config or IngestConfig()
    started = time.monotonic()
    run = _Run(root, config)
    partitions = [p for p in find_partitions(crawl) if p.name not in run.committed]
    progress = tqdm(desc="ingest units", unit="unit", disable=not config.show_progress)
    report = IngestReport()
    for unit in run.unfinished_plans():
        report.units.append(run.ingest(read_plan(run.layout, unit)))
        progress.update()
    for unit, rows in _retry_units(run) if config.retry_failed else []:
        if unit not in run.attempted:
            report.units.append(
                run.plan_and_ingest(unit, f"retry of {unit.split(RETRY_MARK)[0]}", lambda r=rows: r)
            )
            progress.update()
    for partition in partitions:
        if partition.name not in run.attempted:
            rows = lambda p=partition: _partition_rows(p, config)  # noqa: E731
            report.units.append(run.plan_and_ingest(partition.name, partition.url, rows))
            progress.update()
    progress.close()
    report.duration_s = time.monotonic() - started
    log.info("ingest: %d units in %.1f s: %s", len(report.units), report.duration_s, report.totals())
    return report
