"""The chaos runner's read log (``bench/chaos.py``): put this folder first on ``PYTHONPATH`` and set
``GLIP_CHAOS_READS`` (the log file), ``GLIP_CHAOS_ROOT`` (the output root) and ``GLIP_CHAOS_JOB``, and every
Python process of the job (the driver, its Ray workers, img2dataset's processes: they inherit the environment)
appends one JSON line per file it opens for reading under the root's stage outputs, with whether the unit's
ledger entry existed at that moment. Without ``GLIP_CHAOS_READS`` it does nothing.

A ``sys.addaudithook`` hook sees every ``open`` of Python code (``open``, ``io.open``, fsspec's local files);
the engine reads its outputs through fsspec (``pipeline.storage``, ``pipeline.tars``), never through a native
reader, so nothing it reads escapes the log. Output files map to ledger entries as ``pipeline.layout`` names
them: ``images/<partition>/...`` -> ``ledger/ingest/<partition>``, ``phrases/<unit>.parquet`` ->
``ledger/phrases/<unit>``, ``labels/<teacher>/<unit>.{parquet,tar}`` -> ``ledger/label-<teacher>/<unit>``,
``errors/<stage>/<unit>.parquet`` -> ``ledger/<stage>/<unit>``.
"""

from __future__ import annotations

import json
import os
import sys


def ledger_entry(relative: str) -> str | None:
    """The ledger entry (relative to the root) that must exist before ``relative`` may be read; None for files
    outside the stage outputs (ledger, plans, seen-sets, rounds) and for temporary files."""
    parts = relative.split("/")
    if ".tmp-" in relative or len(parts) < 3:
        return None
    top, name = parts[0], parts[-1]
    if top == "images":
        return f"ledger/ingest/{parts[1]}.json"
    if top == "phrases" and name.endswith(".parquet"):
        return f"ledger/phrases/{relative[len('phrases/') : -len('.parquet')]}.json"
    if top == "labels" and name != "_job.json" and name.endswith((".parquet", ".tar")):
        unit = "/".join(parts[2:]).rsplit(".", 1)[0]
        return f"ledger/label-{parts[1]}/{unit}.json"
    if top == "errors" and name.endswith(".parquet"):
        unit = "/".join(parts[2:]).rsplit(".", 1)[0]
        return f"ledger/{parts[1]}/{unit}.json"
    return None


def _install(log: str, root: str, job: str) -> None:
    root = os.path.abspath(root).rstrip("/") + "/"

    def hook(event: str, args: tuple) -> None:
        if event != "open":
            return
        path, mode = args[0], args[1]
        if not isinstance(mode, str) or any(flag in mode for flag in "wax+"):
            return  # a write, or os.open (mode None): this log's own appends come through os.open
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if not isinstance(path, str):
            return  # a file descriptor
        path = os.path.abspath(path)
        if not path.startswith(root):
            return
        relative = path[len(root) :]
        entry = ledger_entry(relative)
        if entry is None:
            return
        line = {"pid": os.getpid(), "job": job, "path": relative, "entry": entry,
                "entry_existed": os.path.exists(root + entry)}  # fmt: skip
        descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, (json.dumps(line) + "\n").encode())
        finally:
            os.close(descriptor)

    sys.addaudithook(hook)


if os.environ.get("GLIP_CHAOS_READS"):
    _install(
        os.environ["GLIP_CHAOS_READS"], os.environ["GLIP_CHAOS_ROOT"], os.environ.get("GLIP_CHAOS_JOB", "")
    )
