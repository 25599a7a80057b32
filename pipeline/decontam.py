"""Decontamination: drop crawl images that are copies of evaluation images.

An evaluation set is indexed once (``build_eval_index``): the sha256 of each image file's bytes and its
perceptual hash (imagehash's DCT ``phash``, 64 bits kept as one ``uint64``). A crawl image matches when
the sha256 of its downloaded bytes equals one of the evaluation hashes (an exact copy), or when the Hamming
distance between the perceptual hashes is at most a threshold (a re-encoded, resized or recompressed copy).

``decontaminate_shard`` removes the matching samples from an image shard in img2dataset's webdataset layout
and marks them ``status="decontaminated"`` in its parquet, naming the matching evaluation image. It rewrites
the parquet first, then the tar, then the stats, each atomically; a crash in between is repaired by calling it
again, because samples the parquet already marks are dropped from the tar whether or not they match again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DECONTAMINATED = "decontaminated"
# Unrelated images' 64-bit phashes differ in about 32 bits; re-encoded or resized copies in a few.
DEFAULT_PHASH_THRESHOLD = 8
# Rows of the [rows, eval images] distance matrix computed at once, to bound memory for large evaluation sets.
_DISTANCE_ROWS = 256


@dataclass(frozen=True)
class EvalIndex:
    """Hashes of an evaluation set.

    ``sha256``: hex digest of an image file's bytes -> its name. ``phashes``: ``uint64[M]`` perceptual hashes,
    with ``phash_names[i]`` naming image i (``<file path>`` or ``<tar path>::<member>``).
    """

    sha256: dict[str, str] = field(default_factory=dict)
    phashes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))
    phash_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.phash_names)

    def match(
        self, sha256: Sequence[str | None], phashes: Sequence[int | None], threshold: int
    ) -> list[str | None]:
        """For each of N crawl images, the reason it matches the set, or None.

        ``sha256``: ``[N]`` hex digests of the downloaded bytes; ``phashes``: ``[N]`` 64-bit perceptual
        hashes.
        None (unknown digest, image that does not decode) matches nothing.
        """
        reasons: list[str | None] = [
            f"matches evaluation image {self.sha256[digest]} (exact sha256)"
            if digest in self.sha256
            else None
            for digest in sha256
        ]
        rows = [i for i, value in enumerate(phashes) if value is not None and reasons[i] is None]
        if len(self) == 0 or not rows:
            return reasons
        for start in range(0, len(rows), _DISTANCE_ROWS):
            block_rows = rows[start : start + _DISTANCE_ROWS]
            block = np.array([phashes[i] for i in block_rows], dtype=np.uint64)
            distances = np.bitwise_count(block[:, None] ^ self.phashes[None, :])  # [rows, M]
            nearest = distances.argmin(axis=1)
            for position, (row, column) in enumerate(zip(block_rows, nearest)):
                distance = int(distances[position, column])
                if distance <= threshold:
                    name = self.phash_names[column]
                    reasons[row] = f"matches evaluation image {name} (phash distance {distance})"
        return reasons


def image_phash(data: bytes) -> int | None:
    """64-bit DCT perceptual hash of an encoded image as an int, or None when it will not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # phash looks at a 32x32 grey thumbnail; JPEG draft mode decodes at a reduced scale, much faster.
            image.draft("L", (128, 128))
            bits = imagehash.phash(image.convert("L")).hash.reshape(-1)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        log.debug("phash: undecodable image (%s)", error)
        return None
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def build_eval_index(sources: Sequence[str]) -> EvalIndex:
    """Index the images of evaluation sets.

    Each source is an fsspec URL of: a folder of images (searched recursively), a folder of webdataset
    ``.tar`` shards, one ``.tar`` shard, or a COCO json whose ``images[].file_name`` resolve relative to the
    json's folder (or, failing that, its parent folder). A listed image that cannot be read raises, because a
    silently skipped evaluation image could leak into training.
    """
    sha256: dict[str, str] = {}
    names: list[str] = []
    hashes: list[int] = []
    for source in sources:
        for name, data in _source_images(source):
            sha256.setdefault(hashlib.sha256(data).hexdigest(), name)
            value = image_phash(data)
            if value is None:
                log.warning("evaluation image %s does not decode: only its exact hash is indexed", name)
                continue
            names.append(name)
            hashes.append(value)
    log.info("evaluation index: %d files, %d perceptual hashes", len(sha256), len(names))
    return EvalIndex(sha256, np.array(hashes, dtype=np.uint64), tuple(names))


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
    for image in coco.get("images", []):
        candidates = [storage.join(folder, image["file_name"]), storage.join(parent, image["file_name"])]
        found = next((c for c in candidates if fs.isfile(c)), None)
        if found is None:
            raise FileNotFoundError(f"{path}: image {image['file_name']!r} not found next to the json")
        yield found, fs.cat_file(found)


def _tar_images(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, bytes]]:
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as archive:
        for member in archive:
            if member.isfile() and member.name.lower().endswith(IMAGE_EXTENSIONS):
                yield f"{path}::{member.name}", archive.extractfile(member).read()


@dataclass
class _ShardScan:
    """What one pass over a shard's tar learns: ``uint64`` phash and original-bytes sha256 per sample key."""

    keys: list[str] = field(default_factory=list)
    sha256: list[str | None] = field(default_factory=list)
    phashes: list[int | None] = field(default_factory=list)


def _sample_key(member_name: str) -> tuple[str, str]:
    """webdataset's split of a member name: key = path up to the first dot of the base name."""
    folder, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _scan_tar(fs: fsspec.AbstractFileSystem, tar_path: str) -> _ShardScan:
    images: dict[str, bytes] = {}
    original_sha256: dict[str, str] = {}
    with fs.open(tar_path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, extension = _sample_key(member.name)
            data = archive.extractfile(member).read()
            if "." + extension in IMAGE_EXTENSIONS:
                images[key] = data
            elif extension == "json":
                original_sha256[key] = json.loads(data).get("sha256")
    scan = _ShardScan()
    for key, data in images.items():
        phash = image_phash(data)
        # The tar holds possibly re-encoded bytes; the json's sha256 is of the bytes as downloaded.
        scan.keys.append(key)
        scan.sha256.append(original_sha256.get(key) or hashlib.sha256(data).hexdigest())
        scan.phashes.append(phash)
    return scan


def decontaminate_shard(
    fs: fsspec.AbstractFileSystem, folder: str, shard: str, index: EvalIndex, threshold: int
) -> dict[str, str]:
    """Drop the samples of ``<folder>/<shard>.tar`` that match ``index``; return ``{key: reason}`` dropped.

    ``shard`` is img2dataset's shard name (``00000``). Rewrites ``<shard>.parquet`` (status, error_message),
    ``<shard>.tar`` (matching samples removed) and ``<shard>_stats.json`` (successes, decontaminated).
    Idempotent, and safe to call again after a crash part-way.
    """
    tar_path = storage.join(folder, f"{shard}.tar")
    parquet_path = storage.join(folder, f"{shard}.parquet")
    table = pq.read_table(parquet_path, filesystem=fs)
    drops = {
        key: message
        for key, status, message in zip(
            *(table.column(c).to_pylist() for c in ("key", "status", "error_message"))
        )
        if status == DECONTAMINATED
    }
    scan = _scan_tar(fs, tar_path)
    for key, reason in zip(scan.keys, index.match(scan.sha256, scan.phashes, threshold)):
        if reason is not None and key not in drops:
            drops[key] = reason
    if not drops:
        return {}
    table = _mark_decontaminated(table, drops)
    with storage.atomic_writer(fs, parquet_path) as handle:
        pq.write_table(table, handle)
    if any(key in drops for key in scan.keys):
        _rewrite_tar(fs, tar_path, set(drops))
    _update_stats(fs, storage.join(folder, f"{shard}_stats.json"), table)
    log.info("shard %s/%s: %d samples decontaminated", folder, shard, len(drops))
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


def _rewrite_tar(fs: fsspec.AbstractFileSystem, tar_path: str, dropped_keys: set[str]) -> None:
    with (
        fs.open(tar_path, "rb") as source_handle,
        tarfile.open(fileobj=source_handle, mode="r|") as source,
        storage.atomic_writer(fs, tar_path) as target_handle,
        tarfile.open(fileobj=target_handle, mode="w|") as target,
    ):
        for member in source:
            if _sample_key(member.name)[0] in dropped_keys:
                continue
            target.addfile(member, source.extractfile(member) if member.isfile() else None)


def _update_stats(fs: fsspec.AbstractFileSystem, stats_path: str, table: pa.Table) -> None:
    if not fs.exists(stats_path):
        return
    stats = storage.read_json(fs, stats_path)
    status = table.column("status").to_pylist()
    stats["successes"] = status.count("success")
    stats[DECONTAMINATED] = status.count(DECONTAMINATED)
    storage.write_json(fs, stats_path, stats)
