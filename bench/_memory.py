"""Child process of ``bench/label.py``: label every pending shard under a root in a fresh interpreter and
report its memory.

    python bench/_memory.py --root ROOT --teacher CHECKPOINT [--threads 2]

Loads the teacher, then labels the shards one after another with the in-process executor
(``pipeline.executor.run_units``, which commits each shard: outputs, error table, ledger entry), with the same
``LabelShard`` and default ``LabelConfig`` as the parent's end-to-end figure. Prints as its last line one
JSON object: ``images``, ``shards``, ``seconds``, ``rss_after_load_mib`` (resident set once the teacher is
loaded), ``peak_rss_mib`` (``VmHWM`` of this process: the whole run, teacher loading included, also
``peak_rss_after_load_mib`` and ``peak_rss_after_shard_mib``: when it was reached) and
``rss_after_shard_mib`` (resident set after each shard: flat when labeling streams).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

# Run as `python bench/_memory.py` from anywhere: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import graph  # noqa: E402
from pipeline.executor import run_units  # noqa: E402
from pipeline.label import LabelConfig, LabelSettings, LabelShard  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from teacher.teacher import Teacher, TeacherConfig  # noqa: E402

_MIB = 2**20


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux ``/proc/self/statm``: pages, second field)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / _MIB


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB: ``VmHWM`` of ``/proc/self/status`` (KiB).

    Not ``ru_maxrss``: Linux carries the high-water mark across ``execve``, so a child started from a large
    parent (``bench/label.py`` holds a teacher and spaCy) reports the parent's peak as its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def label_root(root: str, checkpoint: str, threads: int) -> dict:
    """Label all pending shards under ``root`` with the teacher at ``checkpoint``; returns the figures."""
    torch.set_num_threads(threads)
    settings = LabelSettings(TeacherConfig(checkpoint=checkpoint, device="cpu"), LabelConfig())
    teacher = Teacher.from_checkpoint(settings.teacher)
    stage = LabelShard(teacher, settings.label)
    after_load, peak_after_load = rss_mib(), peak_rss_mib()
    layout = Layout(root)
    shards = graph.pending(layout, "label", settings)
    began = time.perf_counter()
    images, after_shard, peak_after_shard = 0, [], []
    for shard in shards:
        results = run_units(layout, [shard], lambda: stage, stage.stage, in_process=True, prepare=True,
                            max_attempts=1, progress=False)  # fmt: skip
        if results[shard].status != "done":
            raise RuntimeError(f"labelling {shard} failed: {results[shard].error}")
        images += results[shard].stats["images"]
        after_shard.append(round(rss_mib(), 1))
        peak_after_shard.append(round(peak_rss_mib(), 1))
    return {
        "images": images,
        "shards": len(shards),
        "seconds": round(time.perf_counter() - began, 3),
        "rss_after_load_mib": round(after_load, 1),
        "peak_rss_after_load_mib": round(peak_after_load, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_after_shard_mib": after_shard,
        "peak_rss_after_shard_mib": peak_after_shard,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(label_root(args.root, args.teacher, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
