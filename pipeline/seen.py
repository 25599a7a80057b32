"""The URL seen-set: which sample uids earlier ingest units have already attempted.

A sample's ``uid`` (``pipeline.schema.url_uid``: the first 16 hex digits of sha256(url)) is here the first 8
bytes of the digest read as a big-endian uint64. Each committed ingest unit stores the uids it attempted as
one sorted ``uint64`` ``.npy`` file (8 bytes a URL: 10M URLs are 80 MB, not a giant JSON). A run loads the
files of the committed units only, merges them into one sorted array and answers membership with
``np.searchsorted``; a unit that crashed before its ledger entry contributes nothing, so the set never holds
uncommitted work.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence

import fsspec
import numpy as np

from pipeline import storage
from pipeline.schema import uid_bytes

log = logging.getLogger(__name__)

UID_DTYPE = np.dtype(np.uint64)


def url_uids(urls: Iterable[str]) -> np.ndarray:
    """uids of ``urls`` as ``uint64[N]``, in input order (the integer value of ``schema.url_uid``)."""
    prefixes = b"".join(uid_bytes(url) for url in urls)
    return np.frombuffer(prefixes, dtype=">u8").astype(UID_DTYPE)


def uids_to_hex(values: np.ndarray) -> list[str]:
    """``uint64[N]`` uids -> their 16-hex-digit strings."""
    return [f"{int(value):016x}" for value in values]


def hex_to_uids(uids: Sequence[str]) -> np.ndarray:
    """16-hex-digit uid strings -> ``uint64[N]``."""
    return np.fromiter((int(uid, 16) for uid in uids), dtype=UID_DTYPE, count=len(uids))


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct ``uint64`` values (``np.unique`` is many times slower than a sort on uint64)."""
    ordered = np.sort(np.asarray(values, dtype=UID_DTYPE))
    if ordered.size == 0:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def first_occurrences(values: np.ndarray) -> np.ndarray:
    """``bool[N]``: True where ``values[i]`` occurs for the first time in ``values``."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.zeros(len(values), dtype=bool)
    first[order[np.concatenate(([True], ordered[1:] != ordered[:-1]))[: len(values)]]] = True
    return first


def write_uids(fs: fsspec.AbstractFileSystem, path: str, uids: np.ndarray) -> None:
    """Store ``uids`` (any order, duplicates allowed) as one sorted unique ``uint64`` .npy object."""
    buffer = io.BytesIO()
    np.save(buffer, sorted_unique(uids), allow_pickle=False)
    storage.write_bytes(fs, path, buffer.getvalue())


def read_uids(fs: fsspec.AbstractFileSystem, path: str) -> np.ndarray:
    """The sorted ``uint64[N]`` array written by ``write_uids``."""
    return np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False).astype(UID_DTYPE, copy=False)


class SeenSet:
    """A set of uint64 uids kept as one sorted array; ``add`` is batched and merged on the next lookup."""

    def __init__(self, arrays: Iterable[np.ndarray] = ()) -> None:
        self._sorted = np.empty(0, dtype=UID_DTYPE)
        self._pending: list[np.ndarray] = [np.asarray(a, dtype=UID_DTYPE) for a in arrays]

    @classmethod
    def load(cls, fs: fsspec.AbstractFileSystem, paths: Sequence[str]) -> SeenSet:
        """Union of the uid files at ``paths`` (one per committed unit)."""
        seen = cls(read_uids(fs, path) for path in paths)
        log.info("seen-set: %d uids from %d committed units", len(seen), len(paths))
        return seen

    def _merge(self) -> np.ndarray:
        if self._pending:
            self._sorted = sorted_unique(np.concatenate([self._sorted, *self._pending]))
            self._pending = []
        return self._sorted

    def __len__(self) -> int:
        return int(self._merge().size)

    def add(self, uids: np.ndarray) -> None:
        self._pending.append(np.asarray(uids, dtype=UID_DTYPE))

    def contains(self, uids: np.ndarray) -> np.ndarray:
        """``bool[N]``: whether each of ``uids`` (``uint64[N]``) is in the set."""
        known = self._merge()
        query = np.asarray(uids, dtype=UID_DTYPE)
        if known.size == 0:
            return np.zeros(query.shape, dtype=bool)
        # Sorted queries walk the array in order: several times faster than random probes at 10M uids.
        order = np.argsort(query)
        positions = np.searchsorted(known, query[order])
        found = np.empty(query.shape, dtype=bool)
        found[order] = known[np.minimum(positions, known.size - 1)] == query[order]
        return found
