"""Storage on any fsspec URL: a local path, ``memory://``, ``s3://``.

Every stage writes its outputs through these helpers so that one rule holds everywhere: an object is either
absent or complete. Local files are written to a temporary name in the same folder and renamed (atomic on
POSIX); object stores make a single PUT visible atomically, so there the final object is written directly.
A unit's ledger entry (see ``pipeline.ledger``) is written only after all its outputs, and readers trust only
units that have one.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a URL; ``path`` has no protocol and no trailing slash."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path.rstrip("/") or path


# Roots whose objects a process reads by URL alone (a training record names its image by URL, not by root): the
# root's options, by URL prefix (``remember_options``).
_OPTIONS_BY_PREFIX: dict[str, dict[str, Any]] = {}


def remember_options(prefix: str, storage_options: Mapping[str, Any]) -> None:
    """Read every URL under ``prefix`` with ``storage_options`` in this process (``filesystem_of``); a process
    that reads records of a root on an S3-compatible store with an endpoint or keys of its own calls this (a
    training worker, with what ``remembered_options`` gave the driver)."""
    _OPTIONS_BY_PREFIX[prefix.rstrip("/")] = dict(storage_options)


def remembered_options() -> dict[str, dict[str, Any]]:
    """What ``remember_options`` was told in this process, to pass to workers."""
    return {prefix: dict(options) for prefix, options in _OPTIONS_BY_PREFIX.items()}


def filesystem_of(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``filesystem(url)`` with the options remembered for the longest prefix of ``url`` (none: fsspec's
    defaults, e.g. ``AWS_*`` variables)."""
    found = [p for p in _OPTIONS_BY_PREFIX if url == p or url.startswith(p + "/")]
    return filesystem(url, **(_OPTIONS_BY_PREFIX[max(found, key=len)] if found else {}))


def join(*parts: str) -> str:
    """Join path parts with '/' (fsspec paths are '/'-separated on every filesystem)."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p != "")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """An fsspec path back to a URL that another fsspec user (img2dataset) resolves the same way."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole object."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def put_file(fs: fsspec.AbstractFileSystem, local: str | os.PathLike, path: str) -> None:
    """Upload the local file ``local`` to ``path``, streamed (a checkpoint need not fit in memory). Object
    stores show it only once whole (S3's multipart upload completes in one step); a local target is written
    to a temporary sibling and renamed, as ``write_bytes`` does."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not is_local(fs):
        fs.put_file(os.fspath(local), path)
        return
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        fs.put_file(os.fspath(local), temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextmanager
def atomic_writer(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[io.BufferedWriter]:
    """Yield a binary file to write; on success it appears at ``path`` whole, on error not at all.

    Local files stream to a temporary sibling and are renamed; on object stores the bytes are buffered in
    memory and put once, because a multipart upload left half-done would otherwise be invisible garbage.
    """
    if is_local(fs):
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(temporary, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return
    buffer = io.BytesIO()
    yield buffer
    write_bytes(fs, path, buffer.getvalue())


def write_parquet(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write ``table`` as one Parquet file, atomically (see ``atomic_writer``)."""
    with atomic_writer(fs, path) as handle:
        pq.write_table(table, handle)


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (``columns`` only, when given), with its schema metadata."""
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def write_json(fs: fsspec.AbstractFileSystem, path: str, value: Any) -> None:
    write_bytes(fs, path, json.dumps(value, indent=1, sort_keys=True).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def list_names(fs: fsspec.AbstractFileSystem, folder: str, suffix: str = "") -> list[str]:
    """Sorted base names in ``folder`` ending with ``suffix``; an absent folder is empty."""
    if not fs.exists(folder):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
    return sorted(n for n in names if n.endswith(suffix) and ".tmp-" not in n)
