"""Every path under an output root, named in one place.

```
<root>/images/<partition>/NNNNN.{tar,parquet}, NNNNN_stats.json   ingest output (img2dataset layout)
<root>/ingest/plan/<unit>/ and ingest/seen/<unit>.npy             ingest's fixed inputs and claimed uids
<root>/phrases/<shard>.parquet                                   phrase tables
<root>/labels/<teacher>/<shard>.{parquet,tar}, _job.json          pseudo-label shards, per teacher
<root>/errors/<stage>/<unit>.parquet                             one error table per finished unit
<root>/ledger/<stage>/<unit>.json                                written last: the unit is done
<root>/rounds/r<k>/                                              teacher-student rounds
<root>/<stage>/<unit><suffix>                                    any other stage's output (``output``)
```

Folder names are ``Folders`` fields, so a root can be laid out differently without touching a stage. Unit
names may contain '/' (``<partition>/<shard>``); they never start with '/' nor contain '..'. A ``Layout`` is
picklable (Ray workers get it with every unit): it carries the root URL, its folder names and the fsspec
options, and opens its filesystem again where it is unpickled.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from fsspec.implementations.memory import MemoryFileSystem

from pipeline import storage


@dataclass(frozen=True)
class Folders:
    """The top-level folder names under a root (each one path segment)."""

    images: str = "images"
    ingest: str = "ingest"
    phrases: str = "phrases"
    labels: str = "labels"
    errors: str = "errors"
    ledger: str = "ledger"
    rounds: str = "rounds"

    def __post_init__(self) -> None:
        names = [getattr(self, f.name) for f in dataclasses.fields(self)]
        for name in names:
            _check_segment(name, "folder name")
        if len(set(names)) != len(names):
            raise ValueError(f"folder names must differ: {self}")


class Layout:
    """The paths of one output root (any fsspec URL: a local path, ``memory://``, ``s3://``).

    Args:
        root: the root URL; a local path is made absolute.
        folders: the folder names (default: ``Folders()``).
        storage_options: fsspec options for the root (e.g. ``endpoint_url``, ``key``, ``secret``).
    """

    def __init__(self, root: str, folders: Folders | None = None, **storage_options: Any) -> None:
        root = str(root)
        if "://" not in root:
            root = os.path.abspath(root)
        self.url = root
        self.folders = folders or Folders()
        self.storage_options = dict(storage_options)
        self.fs, self.root = storage.filesystem(root, **storage_options)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "folders": self.folders, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["folders"], **state["storage_options"])

    def __repr__(self) -> str:
        return f"Layout({self.url!r})"

    @property
    def in_driver_memory(self) -> bool:
        """True on fsspec's in-process memory filesystem, which other processes (Ray workers) cannot see."""
        return isinstance(self.fs, MemoryFileSystem)

    # -- ingest

    def image_folder(self, partition: str) -> str:
        return self._join(self.folders.images, _unit(partition))

    def image_shard(self, shard: str, suffix: str) -> str:
        """``images/<shard><suffix>``; suffix ``.tar``, ``.parquet`` or ``_stats.json``."""
        return self._join(self.folders.images, _unit(shard) + suffix)

    def ingest_plans(self) -> str:
        return self._join(self.folders.ingest, "plan")

    def ingest_plan(self, unit: str, name: str = "") -> str:
        return self._join(self.folders.ingest, "plan", _unit(unit), name)

    def ingest_seen(self, unit: str) -> str:
        return self._join(self.folders.ingest, "seen", _unit(unit) + ".npy")

    # -- phrases and labels

    def phrase_table(self, shard: str) -> str:
        return self._join(self.folders.phrases, _unit(shard) + ".parquet")

    def label_folder(self, teacher: str) -> str:
        return self._join(self.folders.labels, _check_segment(teacher, "teacher name"))

    def label_shard(self, teacher: str, shard: str, suffix: str) -> str:
        """``labels/<teacher>/<shard><suffix>``; suffix ``.parquet`` or ``.tar``."""
        return storage.join(self.label_folder(teacher), _unit(shard) + suffix)

    def label_job(self, teacher: str) -> str:
        return storage.join(self.label_folder(teacher), "_job.json")

    # -- every stage

    def errors(self, stage: str, unit: str) -> str:
        return self._join(self.folders.errors, _check_segment(stage, "stage name"), _unit(unit) + ".parquet")

    def ledger_folder(self, stage: str) -> str:
        return self._join(self.folders.ledger, _check_segment(stage, "stage name"))

    def ledger_entry(self, stage: str, unit: str) -> str:
        return storage.join(self.ledger_folder(stage), _unit(unit) + ".json")

    def output(self, stage: str, unit: str, suffix: str = "") -> str:
        """``<stage>/<unit><suffix>``: where a stage without a named path of its own writes."""
        return self._join(_check_segment(stage, "stage name"), _unit(unit) + suffix)

    def round(self, number: int, name: str = "") -> str:
        """``rounds/r<number>/<name>``: a teacher-student round's checkpoint, metrics and lineage."""
        if number < 0:
            raise ValueError(f"round numbers are >= 0, got {number}")
        return self._join(self.folders.rounds, f"r{number}", name)

    # -- paths as URLs

    def relative(self, path: str) -> str:
        """``path`` relative to the root (what ledger entries record)."""
        return path[len(self.root) :].lstrip("/") if path.startswith(self.root) else path

    def url_of(self, path: str) -> str:
        """An fsspec path back to a URL that other fsspec users (img2dataset) resolve the same way."""
        return storage.url_of(self.fs, path)

    def _join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)


def _check_segment(name: str, what: str) -> str:
    if not name or "/" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"a {what} is one path segment, got {name!r}")
    return name


def _unit(unit: str) -> str:
    if not unit or unit.startswith("/") or ".." in unit.split("/") or "\\" in unit:
        raise ValueError(f"invalid unit name {unit!r}")
    return unit
