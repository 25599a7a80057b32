"""A training run's saves mirrored to object storage, for runs whose output root is not a filesystem.

``student.train`` writes its saves into a local run folder (atomically: ``train._save``). With a mirror (an
fsspec URL, e.g. ``s3://bucket/engine/rounds/r0/student``), rank 0 uploads each save after writing it::

    <mirror>/saves/<step, 8 digits>/checkpoint/{model.safetensors,config.json}
    <mirror>/saves/<step>/train_state.pt
    <mirror>/saves/<step>/metrics.jsonl
    <mirror>/saved.json            {"step": ..., "save": "saves/<step>"}: written last, the commit

and then removes the older saves. A run started on a machine whose run folder holds an older save than the
mirror's (another node ran it, or this one lost its disk) first brings the mirror's save into the run folder
through the same staging folder and commit mark as a local save, then resumes from it. A run killed during an
upload leaves ``saved.json`` naming the previous save, whole; the half-uploaded folder is replaced by the next
upload of that step. Each object store PUT is atomic, so ``saved.json`` is never half written.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch

from pipeline import storage

logger = logging.getLogger(__name__)

MARKER = "saved.json"
SAVES = "saves"
# What one save is, relative to the run folder (the checkpoint folder's files, then the state, then the log).
SAVED_FILES = ("checkpoint", "train_state.pt", "metrics.jsonl")


@dataclass(frozen=True)
class Mirror:
    """Where a run's saves are mirrored: ``url`` (any fsspec URL) read and written with ``storage_options``
    (kept out of the repr: they may hold credentials)."""

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return storage.filesystem(self.url, **dict(self.storage_options))

    def last(self) -> dict[str, Any] | None:
        """The commit mark of the last whole save (``step``, ``save``), or None before the first."""
        fs, path = self.filesystem()
        marker = storage.join(path, MARKER)
        return storage.read_json(fs, marker) if fs.exists(marker) else None

    def checkpoint_url(self) -> str:
        """The URL of the last save's checkpoint folder (FileNotFoundError before the first save)."""
        last = self.last()
        if last is None:
            raise FileNotFoundError(f"{self.url}: no save mirrored yet ({MARKER} is missing)")
        fs, path = self.filesystem()
        return fs.unstrip_protocol(storage.join(path, last["save"], "checkpoint"))

    def push(self, run_dir: Path, step: int) -> None:
        """Upload ``run_dir``'s save of ``step``, commit it, then remove the older saves."""
        fs, path = self.filesystem()
        save = f"{SAVES}/{step:08d}"
        for local in _save_files(run_dir):  # streamed (multipart on S3: visible only once whole)
            storage.put_file(fs, local, storage.join(path, save, local.relative_to(run_dir).as_posix()))
        storage.write_json(fs, storage.join(path, MARKER), {"step": step, "save": save})
        for old in storage.list_names(fs, storage.join(path, SAVES)):
            if old != save.rsplit("/", 1)[-1]:
                fs.rm(storage.join(path, SAVES, old), recursive=True)

    def push_if_newer(self, run_dir: Path) -> int | None:
        """Upload ``run_dir``'s own save when the mirror has none as new (a run killed while uploading its last
        save, then started again: it trains no step, so no save would upload it). Returns the step, or None."""
        step, last = _local_step(run_dir), self.last()
        if step < 0 or (last is not None and last["step"] >= step):
            return None
        self.push(run_dir, step)
        return step

    def pull(self, run_dir: Path, staging: Path, commit: Callable[[Path], None]) -> int | None:
        """Bring the mirror's last save into ``run_dir`` when it is newer than ``run_dir``'s own: download it
        into ``staging`` (the run folder's staging folder, emptied first), then ``commit(run_dir)`` moves it
        into place as a local save is. Returns the step brought, or None (nothing newer)."""
        last = self.last()
        if last is None or last["step"] <= _local_step(run_dir):
            return None
        fs, path = self.filesystem()
        source = storage.join(path, last["save"])
        shutil.rmtree(staging, ignore_errors=True)
        for remote in sorted(fs.find(source)):
            local = staging / remote[len(source) :].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
        (staging / "complete").touch()
        metrics = staging / "metrics.jsonl"
        if metrics.exists():  # the log goes with the save it ends at
            metrics.replace(run_dir / "metrics.jsonl")
        commit(run_dir)
        logger.info("%s: brought save of step %d from %s", run_dir, last["step"], self.url)
        return int(last["step"])


def _save_files(run_dir: Path) -> list[Path]:
    files = []
    for name in SAVED_FILES:
        item = run_dir / name
        files.extend(
            sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item] * item.is_file()
        )
    return files


def _local_step(run_dir: Path) -> int:
    """The step of ``run_dir``'s own whole save (-1: none)."""
    state = run_dir / "train_state.pt"
    if not ((run_dir / "checkpoint").is_dir() and state.is_file()):
        return -1
    return int(torch.load(state, weights_only=True)["step"])
