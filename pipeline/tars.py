"""WebDataset tar shards: one reader, one key rule, one deterministic writer, through the webdataset library.

The key rule is webdataset's (``base_plus_ext``): member ``dir/name.ext1.ext2`` belongs to the sample with key
``dir/name`` under suffix ``ext1.ext2`` (lower-cased). Samples are dicts ``{"__key__": key, suffix: bytes}``.

Reading goes through ``webdataset.tariterators.tar_file_iterator`` and ``group_by_keys`` over a handle opened
by fsspec (webdataset's own ``gopen`` knows neither ``s3://`` nor ``memory://``). The library skips links and
other non-regular members; three things it does not give are added here, as small as they go:

- member names are checked before a sample is built: an absolute name, a ``..`` segment or a backslash is
  reported as an ``unsafe_member_name`` problem and its bytes are never used (so no key can point outside
  the shard when a sample is written out again);
- a duplicate member within one sample (webdataset raises) is reported as ``duplicate_member`` and skipped;
- a tar that ends early (truncated, corrupt) ends the iteration with a ``tar_read_error`` problem after the
  samples read so far, instead of an exception that would lose them. Storage errors (other ``OSError``)
  propagate: the unit fails and is retried, nothing is recorded.

Random access (``member_index``, ``read_member``): a trainer reads one sample's image out of a shard by its
byte range. webdataset's indexed reader (``wids``) keeps its index as a pickle, which a reader must not load
from a shared root, so the index here is built with ``tarfile`` (each member's ``offset_data``) under the same
key rule and the same name checks, and a member is read with one ranged read (``fs.cat_file``).

Writing goes through ``webdataset.TarWriter`` on the file object of ``storage.atomic_writer``, with fixed
headers (the caller's ``mtime``, mode 0o644, uid/gid 0, no user or group names; TarWriter's defaults are the
current time, 0o444 and "bigdata"): a tar's bytes are a function of its samples and ``mtime`` alone.
"""

from __future__ import annotations

import tarfile
import zlib
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from typing import Any, NamedTuple

import fsspec
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from pipeline import storage

Sample = dict[str, Any]
TAR_MODE = 0o644


class TarProblem(NamedTuple):
    """Something in a tar that is not a readable sample: ``reason`` is ``unsafe_member_name``,
    ``duplicate_member`` or ``tar_read_error``; ``detail`` says which member or what failed."""

    reason: str
    detail: str


def sample_key(name: str) -> tuple[str | None, str | None]:
    """``(key, suffix)`` of a member name by webdataset's rule; ``(None, None)`` when it has no suffix."""
    return base_plus_ext(name)


def is_safe_name(name: str) -> bool:
    """A relative member name without '..' segments or backslashes."""
    return bool(name) and not name.startswith("/") and "\\" not in name and ".." not in name.split("/")


def iter_samples(
    fs: fsspec.AbstractFileSystem, path: str, suffixes: Collection[str] | None = None
) -> Iterator[Sample | TarProblem]:
    """The samples of the tar at ``path`` in member order (only ``suffixes`` kept, when given), with a
    ``TarProblem`` where the module docstring says."""
    problems: deque[TarProblem] = deque()
    read_errors: list[TarProblem] = []

    def safe_members(handle: Any) -> Iterator[dict[str, Any]]:
        try:
            for member in tar_file_iterator(handle):
                if is_safe_name(member["fname"]):
                    yield {**member, "__url__": path}
                else:
                    problems.append(TarProblem("unsafe_member_name", repr(member["fname"])))
        except (tarfile.TarError, EOFError, zlib.error) as error:
            # Ending the member stream normally lets group_by_keys hand over the sample it holds.
            read_errors.append(TarProblem("tar_read_error", f"{type(error).__name__}: {error}"))

    def skip_duplicate(error: Exception) -> bool:
        problems.append(TarProblem("duplicate_member", str(error.args[0]) if error.args else repr(error)))
        return True

    keep = None if suffixes is None else set(suffixes)
    with fs.open(path, "rb") as handle:
        for sample in group_by_keys(safe_members(handle), suffixes=keep, handler=skip_duplicate):
            yield from _drain(problems)
            yield sample
    yield from _drain(problems)
    yield from read_errors


class MemberRange(NamedTuple):
    """Where one member's bytes are in its tar: ``[offset, offset + size)``."""

    offset: int
    size: int


def member_index(fs: fsspec.AbstractFileSystem, path: str) -> dict[tuple[str, str], MemberRange]:
    """``(key, suffix) -> MemberRange`` of every regular, safely named member of the tar at ``path`` (one
    sequential pass over its headers; a truncated tar indexes the members before the break)."""
    index: dict[tuple[str, str], MemberRange] = {}
    with fs.open(path, "rb") as handle:
        length = handle.size
        try:
            with tarfile.open(fileobj=handle, mode="r:") as archive:
                for member in archive:
                    key, suffix = sample_key(member.name)
                    whole = member.offset_data + member.size <= length  # a header whose data was cut off
                    if member.isreg() and key is not None and is_safe_name(member.name) and whole:
                        index.setdefault((key, suffix.lower()), MemberRange(member.offset_data, member.size))
        except (tarfile.TarError, EOFError):
            pass  # the members indexed so far are whole; readers find the rest missing
    return index


def read_member(fs: fsspec.AbstractFileSystem, path: str, where: MemberRange) -> bytes:
    """One member's bytes by its range (one ranged read; works on object stores)."""
    return fs.cat_file(path, start=where.offset, end=where.offset + where.size)


def _drain(problems: deque[TarProblem]) -> Iterator[TarProblem]:
    while problems:
        yield problems.popleft()


def write_samples(
    fs: fsspec.AbstractFileSystem, path: str, samples: Iterable[Sample], mtime: float = 0.0
) -> int:
    """Write ``samples`` (keys safe, values bytes; members of a sample in suffix order) to a tar at ``path``,
    atomically; returns the number of samples."""
    count = 0
    with storage.atomic_writer(fs, path) as handle:
        writer = TarWriter(handle, user="", group="", mode=TAR_MODE, encoder=False, mtime=mtime,
                           format="GNU_FORMAT")  # fmt: skip
        try:
            for sample in samples:
                if not is_safe_name(sample["__key__"]):
                    raise ValueError(f"unsafe sample key {sample['__key__']!r}")
                writer.write(sample)
                count += 1
        finally:
            writer.close()
    return count
