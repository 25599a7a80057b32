"""The ledger: one small JSON object per finished unit of work.

``Layout.ledger_entry(stage, unit)`` is written last, after every output of the unit (the executor does it,
see ``pipeline.executor``). Its presence means the unit is done; a re-run does only the units without one.
That single rule gives crash-resume, exactly-once output and incremental processing. Unit names may contain
'/' (e.g. ``<partition>/<shard>``): they become sub-folders of the stage folder.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from pipeline import storage
from pipeline.layout import Layout


class Ledger:
    """The finished units of one stage under an output root."""

    def __init__(self, layout: Layout, stage: str) -> None:
        self.layout = layout
        self.fs = layout.fs
        self.stage = stage
        self.folder = layout.ledger_folder(stage)

    def is_done(self, unit: str) -> bool:
        return self.fs.exists(self.layout.ledger_entry(self.stage, unit))

    def get(self, unit: str) -> dict[str, Any] | None:
        path = self.layout.ledger_entry(self.stage, unit)
        if not self.fs.exists(path):
            return None
        return storage.read_json(self.fs, path)

    def record(self, unit: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Mark ``unit`` done. Call only after every output of the unit is committed."""
        stamped = {"unit": unit, "stage": self.stage, "finished_at": _now(), **entry}
        storage.write_json(self.fs, self.layout.ledger_entry(self.stage, unit), stamped)
        return stamped

    def units(self) -> list[str]:
        """All finished units, sorted (nested unit names included)."""
        if not self.fs.exists(self.folder):
            return []
        prefix = self.folder.rstrip("/") + "/"
        found = []
        for path in self.fs.find(self.folder):
            if path.endswith(".json") and ".tmp-" not in path:
                found.append(path[len(prefix) :] if path.startswith(prefix) else path.rsplit("/", 1)[-1])
        return sorted(name[: -len(".json")] for name in found)

    def pending(self, units: list[str]) -> list[str]:
        """The units of ``units`` that have no ledger entry, in the given order."""
        done = set(self.units())
        return [u for u in units if u not in done]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
