"""Checkpoints named by URL: a teacher on object storage, copied once to each node's disk.

A label actor loads its teacher from local files. On a cluster without a shared filesystem, ``--teacher
s3://bucket/models/glip_t`` names it once for every node: the driver (which names the label folder after the
weights' digest) and each actor copy it into the node's cache the first time, and later loads on that node read
the copy. A copy is named by the URL and by the remote files' names, sizes and ETags (or modification times), so
a checkpoint rewritten at the same URL is fetched again; it keeps the remote folder's or file's name, which the
teacher's default name is taken from, so that a teacher read from a URL has the ``teacher_id`` (and writes the
labels) of the same checkpoint read from a local path.

The cache is ``TeacherConfig.cache``, else ``$GLIP_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/glip-engine`` (by
default ``~/.cache/glip-engine``), under ``checkpoints/``. Copies are written to a temporary folder and renamed
into place, so that actors of one node fetching at once leave one whole copy and never a partial one. Old copies
are not removed (a GLIP-T folder is ~0.9 GB): clear the folder between crawls if disk is short.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec

logger = logging.getLogger(__name__)

CACHE_VARIABLE = "GLIP_ENGINE_CACHE"
LOCAL_PROTOCOLS = ("file", "local")


def is_remote(url: str) -> bool:
    """Whether ``url`` names anything but a local path (``s3://``, ``gs://``, ``memory://``, ...)."""
    protocol, _ = fsspec.core.split_protocol(str(url))
    return protocol is not None and protocol not in LOCAL_PROTOCOLS


def cache_folder(cache: str | Path | None = None) -> Path:
    """Where copies of remote checkpoints go (see the module docstring)."""
    if cache is None:
        cache = os.environ.get(CACHE_VARIABLE)
    if cache is None:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        cache = Path(base) / "glip-engine"
    return Path(cache) / "checkpoints"


def local_checkpoint(
    url: str | Path, storage_options: Mapping[str, Any] | None = None, cache: str | Path | None = None
) -> Path:
    """A local path holding the checkpoint at ``url``: ``url`` itself when it is local, else a copy in the cache
    (fetched now if the cache has none of the remote files as they are).

    Raises:
        FileNotFoundError: nothing at ``url``.
        OSError: a copy came out of another size than the remote file (nothing is left in the cache).
    """
    if not is_remote(str(url)):
        protocol, path = fsspec.core.split_protocol(str(url))
        return Path(path)
    url = str(url).rstrip("/")
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    path = path.rstrip("/")
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no such checkpoint folder or file")
    files = _listing(fs, path)
    key = hashlib.sha256(json.dumps([url, files], sort_keys=True).encode()).hexdigest()[:20]
    name = path.rsplit("/", 1)[-1]
    folder = cache_folder(cache)
    target = folder / key / name
    if target.exists():
        return target
    staging = folder / f"{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _download(fs, path, files, staging / name)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, folder / key)
        except OSError:
            if not target.exists():  # not another process's finished copy: a real failure
                raise
            logger.info("%s: another process fetched it first", url)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("fetched %s into %s", url, target)
    return target


def _listing(fs: fsspec.AbstractFileSystem, path: str) -> list[tuple[str, int, str]]:
    """``(name relative to path, size, version tag)`` of each file at ``path`` (a folder or one file; the
    file's own name is ``""``)."""
    if fs.isdir(path):
        found = fs.find(path, detail=True)
        entries = [(name[len(path) :].lstrip("/"), info) for name, info in found.items()]
    else:
        entries = [("", fs.info(path))]
    return sorted((name, int(info["size"]), _version(info)) for name, info in entries)


def _version(info: Mapping[str, Any]) -> str:
    """What changes when a file is rewritten: its ETag on object stores, else its modification time."""
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _download(
    fs: fsspec.AbstractFileSystem, path: str, files: list[tuple[str, int, str]], target: Path
) -> None:
    for name, size, _ in files:
        source = f"{path}/{name}" if name else path
        local = target / name if name else target
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(source, str(local))
        if local.stat().st_size != size:
            raise OSError(
                f"{fs.unstrip_protocol(source)}: fetched {local.stat().st_size} bytes, expected {size}"
            )
