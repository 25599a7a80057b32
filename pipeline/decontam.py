"""Decontamination: drop crawl images that are copies of evaluation images.

An evaluation set is indexed once (``build_eval_index``): the sha256 of each image file's bytes and its
fingerprint (imagehash's DCT ``phash``, 64 bits kept as one ``uint64``, and a 32x32 grey thumbnail). A crawl
image is a copy when the sha256 of its downloaded bytes equals an evaluation one (an exact copy), or when its
phash is within a Hamming threshold of an evaluation image's AND their thumbnails correlate (a re-encoded,
resized or recompressed copy; the thumbnail rejects look-alikes the phash alone would confuse). Crops and
mirrored copies are not matched.

``decontaminate_shard`` removes the matching samples from an image shard in img2dataset's webdataset layout
and marks them ``status="decontaminated"`` in its parquet, naming the matching evaluation image. It rewrites
the parquet first, then the tar, then the stats, each atomically; a crash in between is repaired by calling it
again, because samples the parquet already marks are dropped from the tar whether or not they match again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from pipeline import images, storage, tars
from pipeline.layout import Layout

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_SUFFIXES = tuple(extension[1:] for extension in IMAGE_EXTENSIONS)
DECONTAMINATED = "decontaminated"
# Unrelated images' 64-bit phashes differ in about 32 bits, re-encoded or resized copies in a few; on
# look-alike pictures (the demo world's shapes) unrelated pairs come as close as 6, hence the second check.
DEFAULT_PHASH_THRESHOLD = 12
# Copies correlate at >= 0.99 on the 32x32 grey thumbnail; look-alikes within the phash threshold at <= 0.8.
DEFAULT_MIN_CORRELATION = 0.9
THUMBNAIL_SIDE = 32
# Rows of the [rows, eval images] distance matrix computed at once, to bound memory for large evaluation sets.
_DISTANCE_ROWS = 256


@dataclass(frozen=True)
class MatchRule:
    """A crawl image is a copy of an evaluation image when its downloaded bytes have the same sha256, or when
    their phashes differ in at most ``phash_threshold`` bits AND their grey thumbnails correlate at
    ``min_correlation`` or more (the phash finds candidates cheaply, the thumbnail rejects look-alikes)."""

    phash_threshold: int = DEFAULT_PHASH_THRESHOLD
    min_correlation: float = DEFAULT_MIN_CORRELATION

    def __post_init__(self) -> None:
        if not 0 <= self.phash_threshold <= 64:
            raise ValueError(f"phash_threshold is a Hamming distance in [0, 64], got {self.phash_threshold}")
        if not -1.0 <= self.min_correlation <= 1.0:
            raise ValueError(f"min_correlation is a correlation in [-1, 1], got {self.min_correlation}")


@dataclass(frozen=True)
class Fingerprint:
    """``phash``: 64-bit DCT perceptual hash (imagehash, as an int). ``thumbnail``: ``float32[1024]``, the
    32x32 grey image standardised to mean 0 and variance 1, so a dot product / 1024 is a correlation."""

    phash: int
    thumbnail: np.ndarray


def fingerprint(data: bytes) -> Fingerprint | None:
    """The fingerprint of an encoded image, or None when it will not decode (or its header claims more than
    ``pipeline.images.MAX_IMAGE_PIXELS`` pixels)."""
    try:
        with images.open_image(data) as image:  # a header over MAX_IMAGE_PIXELS is refused undecoded
            # Both views are 32x32; JPEG draft mode decodes at a reduced scale, much faster.
            image.draft("L", (4 * THUMBNAIL_SIDE, 4 * THUMBNAIL_SIDE))
            grey = image.convert("L")
            bits = imagehash.phash(grey).hash.reshape(-1)
            small = grey.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR)
    except (UnidentifiedImageError, *images.DECODE_ERRORS) as error:  # ImageTooLarge is a ValueError
        log.debug("fingerprint: undecodable image (%s)", error)
        return None
    pixels = np.asarray(small, dtype=np.float32).reshape(-1)
    thumbnail = (pixels - pixels.mean()) / max(float(pixels.std()), 1e-3)
    return Fingerprint(int.from_bytes(np.packbits(bits).tobytes(), "big"), thumbnail)


@dataclass(frozen=True)
class EvalIndex:
    """Fingerprints of an evaluation set.

    ``sha256``: hex digest of an image file's bytes -> its name. ``phashes``: ``uint64[M]``, ``thumbnails``:
    ``float32[M, 1024]``, ``names[i]`` naming image i (``<file path>`` or ``<tar path>::<member>``).
    """

    sha256: dict[str, str] = field(default_factory=dict)
    phashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    thumbnails: np.ndarray = field(default_factory=lambda: np.empty((0, THUMBNAIL_SIDE**2), np.float32))
    names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    def match(
        self, sha256: Sequence[str | None], fingerprints: Sequence[Fingerprint | None], rule: MatchRule
    ) -> list[str | None]:
        """For each of N crawl images, the reason it is a copy of an evaluation image, or None.

        ``sha256``: ``[N]`` hex digests of the downloaded bytes; ``fingerprints``: ``[N]``. None (unknown
        digest, an image that does not decode) matches nothing.
        """
        reasons: list[str | None] = [
            f"matches evaluation image {self.sha256[digest]} (exact sha256)"
            if digest in self.sha256
            else None
            for digest in sha256
        ]
        rows = [i for i, value in enumerate(fingerprints) if value is not None and reasons[i] is None]
        for start in range(0, len(rows) if len(self) else 0, _DISTANCE_ROWS):
            block_rows = rows[start : start + _DISTANCE_ROWS]
            block = np.array([fingerprints[i].phash for i in block_rows], dtype=np.uint64)
            distances = np.bitwise_count(block[:, None] ^ self.phashes[None, :])  # [rows, M]
            for position, row in enumerate(block_rows):
                reasons[row] = self._confirm(fingerprints[row], distances[position], rule)
        return reasons

    def _confirm(self, crawl: Fingerprint, distances: np.ndarray, rule: MatchRule) -> str | None:
        """The first phash candidate (nearest first) whose thumbnail correlates enough, as a reason."""
        candidates = np.flatnonzero(distances <= rule.phash_threshold)
        for column in candidates[np.argsort(distances[candidates], kind="stable")]:
            correlation = float(self.thumbnails[column] @ crawl.thumbnail) / crawl.thumbnail.size
            if correlation >= rule.min_correlation:
                return (
                    f"matches evaluation image {self.names[column]} "
                    f"(phash distance {int(distances[column])}, thumbnail correlation {correlation:.3f})"
                )
        return None


def build_eval_index(sources: Sequence[str]) -> EvalIndex:
    """Index the images of evaluation sets.

    Each source is an fsspec URL of: a folder of images (searched recursively), a folder of webdataset
    ``.tar`` shards, one ``.tar`` shard, or a COCO json whose ``images[].file_name`` resolve relative to the
    json's folder, else its parent folder, else to the one file of that name below the parent folder (COCO's
    ``annotations/`` beside ``val2017/``). A listed image that cannot be found once raises, because a
    silently skipped evaluation image could leak into training.
    """
    sha256: dict[str, str] = {}
    names: list[str] = []
    prints: list[Fingerprint] = []
    for source in sources:
        for name, data in _source_images(source):
            sha256.setdefault(hashlib.sha256(data).hexdigest(), name)
            value = fingerprint(data)
            if value is None:
                log.warning("evaluation image %s does not decode: only its exact hash is indexed", name)
                continue
            names.append(name)
            prints.append(value)
    log.info("evaluation index: %d files, %d fingerprints", len(sha256), len(names))
    phashes = np.array([p.phash for p in prints], dtype=np.uint64)
    thumbnails = np.stack([p.thumbnail for p in prints]) if prints else EvalIndex().thumbnails
    return EvalIndex(sha256, phashes, thumbnails, tuple(names))


def _source_images(source: str) -> Iterator[tuple[str, bytes]]:
    fs, path = storage.filesystem(source)
    if path.endswith(".json"):
        yield from _coco_images(fs, path)
    elif path.endswith(".tar"):
        yield from _tar_images(fs, path)
    elif fs.isdir(path):
        shards = storage.list_names(fs, path, ".tar")
        if shards:
            for shard in shards:
                yield from _tar_images(fs, storage.join(path, shard))
        else:
            for file in sorted(fs.find(path)):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    yield file, fs.cat_file(file)
    else:
        raise FileNotFoundError(f"evaluation set {source!r} is not a folder, a .tar shard or a COCO .json")


def _coco_images(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, bytes]]:
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    parent = folder.rsplit("/", 1)[0] if "/" in folder else "."
    coco = storage.read_json(fs, path)
    below_parent: dict[str, list[str]] | None = None
    for image in coco.get("images", []):
        name = image["file_name"]
        candidates = [storage.join(folder, name), storage.join(parent, name)]
        found = next((c for c in candidates if fs.isfile(c)), None)
        if found is None:
            # COCO keeps images beside the annotations folder (val2017/, images/eval/): search there.
            below_parent = below_parent if below_parent is not None else _files_by_name(fs, parent)
            matches = below_parent.get(name.rsplit("/", 1)[-1], [])
            matches = [m for m in matches if m.endswith("/" + name.lstrip("/"))]
            if len(matches) != 1:
                raise FileNotFoundError(f"{path}: image {name!r} found {len(matches)} times under {parent}")
            found = matches[0]
        yield found, fs.cat_file(found)


def _files_by_name(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, list[str]]:
    """Every file below ``folder`` by base name."""
    index: dict[str, list[str]] = {}
    for file in fs.find(folder):
        index.setdefault(file.rsplit("/", 1)[-1], []).append(file)
    return index


def _tar_images(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, bytes]]:
    for sample in _samples(fs, path):
        for suffix in sorted(set(sample) & set(IMAGE_SUFFIXES)):
            yield f"{path}::{sample['__key__']}.{suffix}", sample[suffix]


def _samples(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tars.Sample]:
    """Every sample of a tar; a tar that cannot be read whole raises (a shard is never rewritten short, and an
    evaluation set is never indexed short)."""
    for item in tars.iter_samples(fs, path):
        if isinstance(item, tars.TarProblem):
            raise ValueError(f"{path}: {item.reason}: {item.detail}")
        yield item


@dataclass
class _ShardScan:
    """What one pass over a shard's tar learns, per sample key: fingerprint and original-bytes sha256."""

    fingerprints: dict[str, Fingerprint | None] = field(default_factory=dict)
    tar_sha256: dict[str, str] = field(default_factory=dict)
    original_sha256: dict[str, str | None] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return list(self.fingerprints)

    def sha256(self) -> list[str]:
        # The tar may hold re-encoded bytes; the json's sha256 is of the bytes as downloaded.
        return [self.original_sha256.get(key) or self.tar_sha256[key] for key in self.fingerprints]


def _scan_tar(fs: fsspec.AbstractFileSystem, tar_path: str) -> _ShardScan:
    scan = _ShardScan()
    for sample in _samples(fs, tar_path):
        key = sample["__key__"]
        image = next((suffix for suffix in sorted(sample) if suffix in IMAGE_SUFFIXES), None)
        if image is not None:
            scan.fingerprints[key] = fingerprint(sample[image])
            scan.tar_sha256[key] = hashlib.sha256(sample[image]).hexdigest()
        if "json" in sample:
            scan.original_sha256[key] = json.loads(sample["json"]).get("sha256")
    return scan


def decontaminate_shard(layout: Layout, shard: str, index: EvalIndex, rule: MatchRule) -> dict[str, str]:
    """Drop the samples of image shard ``shard`` (``<partition>/<NNNNN>``) that match ``index``; return
    ``{key: reason}`` dropped.

    Rewrites the shard's parquet (status, error_message), its tar (matching samples removed) and its
    ``_stats.json`` (successes, decontaminated). Idempotent, and safe to call again after a crash part-way.
    """
    fs = layout.fs
    tar_path = layout.image_shard(shard, ".tar")
    parquet_path = layout.image_shard(shard, ".parquet")
    table = storage.read_parquet(fs, parquet_path)
    drops = {
        key: message
        for key, status, message in zip(
            *(table.column(c).to_pylist() for c in ("key", "status", "error_message"))
        )
        if status == DECONTAMINATED
    }
    scan = _scan_tar(fs, tar_path)
    for key, reason in zip(scan.keys(), index.match(scan.sha256(), list(scan.fingerprints.values()), rule)):
        if reason is not None and key not in drops:
            drops[key] = reason
    if not drops:
        return {}
    table = _mark_decontaminated(table, drops)
    storage.write_parquet(fs, parquet_path, table)
    if any(key in drops for key in scan.fingerprints):
        kept = (sample for sample in _samples(fs, tar_path) if sample["__key__"] not in drops)
        tars.write_samples(fs, tar_path, kept)
    _update_stats(fs, layout.image_shard(shard, "_stats.json"), table)
    log.info("shard %s: %d samples decontaminated", shard, len(drops))
    return drops


def _mark_decontaminated(table: pa.Table, drops: dict[str, str]) -> pa.Table:
    keys = table.column("key").to_pylist()
    status = [
        DECONTAMINATED if key in drops else value for key, value in zip(keys, table["status"].to_pylist())
    ]
    messages = [drops.get(key, value) for key, value in zip(keys, table["error_message"].to_pylist())]
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    position = table.schema.get_field_index("error_message")
    return table.set_column(position, "error_message", pa.array(messages, pa.string()))


def _update_stats(fs: fsspec.AbstractFileSystem, stats_path: str, table: pa.Table) -> None:
    if not fs.exists(stats_path):
        return
    stats = storage.read_json(fs, stats_path)
    status = table.column("status").to_pylist()
    stats["successes"] = status.count("success")
    stats[DECONTAMINATED] = status.count(DECONTAMINATED)
    storage.write_json(fs, stats_path, stats)
