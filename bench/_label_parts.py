"""The parts of the labeling benchmark that both modes use: ``bench/label.py`` (CPU, with Ray and spaCy in
the venv) and ``bench/label_gpu.py run`` (a GPU machine without them). Nothing here imports Ray or spaCy."""

from __future__ import annotations

import platform
import time
from pathlib import Path

from pipeline import storage, tars
from pipeline.label import LabelConfig, decode_image, in_key_order
from pipeline.layout import Layout
from teacher.teacher import Teacher


def model_inputs(root: str, shard: str, teacher: Teacher) -> tuple[int, list[tuple[list, list]]]:
    """The shard's images decoded and their prompts built, in key order and grouped as ``LabelShard`` groups
    them.

    Returns ``(number of images, [(PIL images, prompt lists)] per group)``: decoded beforehand, as the issue
    defines model-only throughput, so the model-only time includes turning them into arrays, which the label
    stage does in its decoding threads (``decode_bgr``); images without phrases belong to no group (they never
    reach the model in the label stage either)."""
    layout = Layout(root)
    phrases = {r["uid"]: r for r in storage.read_parquet(layout.fs, layout.phrase_table(shard)).to_pylist()}
    images = storage.read_parquet(layout.fs, layout.image_shard(shard, ".parquet"), ["key", "uid"])
    uids = {r["key"]: r["uid"] for r in images.to_pylist()}
    pending, count = [], 0
    samples = tars.iter_samples(layout.fs, layout.image_shard(shard, ".tar"), suffixes={"jpg"})
    for sample in in_key_order(samples, uids):  # the order the label stage reads a shard in
        if isinstance(sample, tars.TarProblem):
            raise RuntimeError(f"{shard}: {sample.reason} ({sample.detail})")
        image, _ = decode_image(sample["jpg"])
        row = phrases[uids[sample["__key__"]]]
        prompts = teacher.prompts(row["caption"], [(p["start"], p["end"]) for p in row["phrases"]])
        count += 1
        if prompts:
            pending.append((image, prompts))
    size = LabelConfig().batch_size
    groups = [pending[i : i + size] for i in range(0, len(pending), size)]
    return count, [([g[0] for g in group], [g[1] for g in group]) for group in groups]


class TimedTeacher:
    """A ``Teacher`` for ``LabelShard`` that adds up the seconds spent in its forward passes (``submit`` and
    ``collect``, which waits for the device): the model's part of the label stage's time (decoding runs
    beside it, in threads)."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher
        self.teacher_id, self.config_hash = teacher.teacher_id, teacher.config_hash
        self.batch_size, self.device, self.in_flight = teacher.batch_size, teacher.device, teacher.in_flight
        self.seconds = 0.0

    def token_counts(self, captions: list[str]) -> list[int]:
        return self.teacher.token_counts(captions)

    def prompts(self, caption: str, spans: list[tuple[int, int]], tokens: int | None = None) -> list:
        return self.teacher.prompts(caption, spans, tokens)

    def batch_key(self, image, prompt):
        return self.teacher.batch_key(image, prompt)

    def submit(self, images: list, prompts: list):
        began = time.perf_counter()
        pending = self.teacher.submit(images, prompts)
        self.seconds += time.perf_counter() - began
        return pending

    def collect(self, pending) -> list:
        began = time.perf_counter()
        found = self.teacher.collect(pending)
        self.seconds += time.perf_counter() - began
        return found


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else the machine type."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()
