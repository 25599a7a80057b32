"""WebDataset tar shards: one reader, one key rule, one deterministic writer, through the webdataset library.

The key rule is webdataset's (``base_plus_ext``): member ``dir/name.ext1.ext2`` belongs to the sample with key
``dir/name`` under suffix ``ext1.ext2`` (lower-cased). Samples are dicts ``{"__key__": key, suffix: bytes}``.

Reading (``iter_samples``) walks the tar's members with ``tarfile`` in stream mode (one sequential read of a
handle opened by fsspec; webdataset's own ``gopen`` knows neither ``s3://`` nor ``memory://``) and groups them
into samples with webdataset's ``group_by_keys``. webdataset's member iterator (``tar_file_iterator``) is not
used because it skips links and other non-regular members silently; here every member that is not read is
reported as a ``TarProblem`` in member order, and its bytes are never used:

- a member named with an absolute path, a ``..`` segment or a backslash is ``unsafe_member_name`` (so no key
  can point outside the shard when a sample is written out again);
- a symbolic or hard link, a device or a fifo is ``non_regular_member`` (a link is never followed); folder
  entries are skipped (they hold no data, and a sample key never needs them);
- a duplicate member within one sample (webdataset's ``group_by_keys`` raises) is ``duplicate_member`` and
  skipped;
- a tar that ends early (truncated, corrupt) ends the iteration with a ``tar_read_error`` problem after the
  samples read so far, instead of an exception that would lose them. Storage errors (other ``OSError``)
  propagate: the unit fails and is retried, nothing is recorded.

Random access (``member_index``, ``read_member``): a trainer reads one sample's image out of a shard by its
byte range. webdataset's indexed reader (``wids``) keeps its index as a pickle, which a reader must not load
from a shared root, so the index here is built with ``tarfile`` (each member's ``offset_data``) under the same
key rule and the same member checks (``member_problem``: a member ``iter_samples`` reports is never indexed),
and a member is read with one ranged read (``fs.cat_file``).

Writing goes through ``webdataset.TarWriter`` on the file object of ``storage.atomic_writer`` (all at once,
``write_samples``, or sample by sample as a caller makes them, ``writing_samples``), with fixed
headers (the caller's ``mtime``, mode 0o644, uid/gid 0, no user or group names; TarWriter's defaults are the
current time, 0o444 and "bigdata"): a tar's bytes are a function of its samples and ``mtime`` alone. Every
member name written is checked first: a key or suffix that would make an unsafe name, or a name that would
read back under another key or suffix (a ``/`` in a suffix, a ``.`` in a key), is refused.
"""

from __future__ import annotations

import tarfile
import zlib
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, NamedTuple

import fsspec
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext, group_by_keys

from pipeline import storage

Sample = dict[str, Any]
TAR_MODE = 0o644


class TarProblem(NamedTuple):
    """Something in a tar that is not a readable sample: ``reason`` is ``unsafe_member_name``,
    ``non_regular_member``, ``duplicate_member`` or ``tar_read_error``; ``detail`` says which member or what
    failed."""

    reason: str
    detail: str


def sample_key(name: str) -> tuple[str | None, str | None]:
    """``(key, suffix)`` of a member name by webdataset's rule; ``(None, None)`` when it has no suffix."""
    return base_plus_ext(name)


def is_safe_name(name: str) -> bool:
    """A relative member name without '..' segments or backslashes."""
    return bool(name) and not name.startswith("/") and "\\" not in name and ".." not in name.split("/")


def member_problem(member: tarfile.TarInfo) -> TarProblem | None:
    """Why ``member`` is not read (see the module docstring), or None for a safely named regular file.
    Folder entries are not problems; callers skip them."""
    if not is_safe_name(member.name):
        return TarProblem("unsafe_member_name", repr(member.name))
    if member.isreg() or member.isdir():
        return None
    if member.issym() or member.islnk():
        kind = "symbolic link" if member.issym() else "hard link"
        return TarProblem("non_regular_member", f"{member.name!r}: {kind} to {member.linkname!r}")
    return TarProblem("non_regular_member", f"{member.name!r}: tar member type {member.type!r}")


def iter_samples(
    fs: fsspec.AbstractFileSystem, path: str, suffixes: Collection[str] | None = None
) -> Iterator[Sample | TarProblem]:
    """The samples of the tar at ``path`` in member order (only ``suffixes`` kept, when given), with a
    ``TarProblem`` where the module docstring says."""
    problems: deque[TarProblem] = deque()
    read_errors: list[TarProblem] = []

    def regular_members(handle: Any) -> Iterator[dict[str, Any]]:
        try:
            with tarfile.open(fileobj=handle, mode="r|*") as stream:
                for member in stream:
                    problem = member_problem(member)
                    if problem is not None:
                        problems.append(problem)
                    elif member.isreg():
                        data = stream.extractfile(member).read()
                        yield {"fname": member.name, "data": data, "__url__": path}
                    stream.members = []  # stream mode would keep every header in memory
        except (tarfile.TarError, EOFError, zlib.error) as error:
            # Ending the member stream normally lets group_by_keys hand over the sample it holds.
            read_errors.append(TarProblem("tar_read_error", f"{type(error).__name__}: {error}"))

    def skip_duplicate(error: Exception) -> bool:
        problems.append(TarProblem("duplicate_member", str(error.args[0]) if error.args else repr(error)))
        return True

    keep = None if suffixes is None else set(suffixes)
    with fs.open(path, "rb") as handle:
        for sample in group_by_keys(regular_members(handle), suffixes=keep, handler=skip_duplicate):
            yield from _drain(problems)
            yield sample
    yield from _drain(problems)
    yield from read_errors


class MemberRange(NamedTuple):
    """Where one member's bytes are in its tar: ``[offset, offset + size)``."""

    offset: int
    size: int


def member_index(fs: fsspec.AbstractFileSystem, path: str) -> dict[tuple[str, str], MemberRange]:
    """``(key, suffix) -> MemberRange`` of every member of the tar at ``path`` that ``iter_samples`` would read
    (regular, safely named: ``member_problem`` is None), the first of duplicates; one sequential pass over its
    headers; a truncated tar indexes the members before the break."""
    index: dict[tuple[str, str], MemberRange] = {}
    with fs.open(path, "rb") as handle:
        length = handle.size
        try:
            with tarfile.open(fileobj=handle, mode="r:") as archive:
                for member in archive:
                    key, suffix = sample_key(member.name)
                    whole = member.offset_data + member.size <= length  # a header whose data was cut off
                    readable = member.isreg() and member_problem(member) is None
                    if readable and key is not None and whole:
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


class SampleWriter:
    """Writes samples (keys safe, values bytes; members of a sample in suffix order) one at a time to an open
    binary file, with the fixed headers of the module docstring. ``mtime`` is stored in whole seconds: a float
    one would add a pax header (1 KiB) to every member."""

    def __init__(self, handle: BinaryIO, mtime: float = 0.0) -> None:
        self._writer = TarWriter(handle, user="", group="", mode=TAR_MODE, encoder=False, mtime=int(mtime),
                                 format="GNU_FORMAT")  # fmt: skip
        self.count = 0

    def write(self, sample: Sample) -> None:
        _check_names(sample)
        self._writer.write(sample)
        self.count += 1

    def close(self) -> None:
        self._writer.close()


@contextmanager
def writing_samples(fs: fsspec.AbstractFileSystem, path: str, mtime: float = 0.0) -> Iterator[SampleWriter]:
    """A ``SampleWriter`` whose tar appears at ``path`` whole when the block ends without an error, and not at
    all otherwise (``storage.atomic_writer``): a caller can write samples as it makes them."""
    with storage.atomic_writer(fs, path) as handle:
        writer = SampleWriter(handle, mtime)
        try:
            yield writer
        finally:
            writer.close()


def write_samples(
    fs: fsspec.AbstractFileSystem, path: str, samples: Iterable[Sample], mtime: float = 0.0
) -> int:
    """Write ``samples`` to a tar at ``path``, atomically (``writing_samples``); returns how many."""
    with writing_samples(fs, path, mtime) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.count


def _check_names(sample: Sample) -> None:
    """Refuse a sample whose member names (``<key>.<suffix>``, as TarWriter makes them) are unsafe or would
    read back as another key or suffix."""
    key = sample["__key__"]
    if not isinstance(key, str) or not is_safe_name(key):
        raise ValueError(f"unsafe sample key {key!r}")
    for suffix in sample:
        if suffix.startswith("_"):
            continue  # TarWriter writes no member for __key__ and other private fields
        name = f"{key}.{suffix}"
        if not is_safe_name(name) or sample_key(name) != (key, suffix):
            raise ValueError(f"unsafe member name {name!r} (key {key!r}, suffix {suffix!r})")
