"""Label actors on this machine: one actor against two, on Ray, through the real label stage.

    python bench/actors.py [--images 384] [--shard-size 32] [--teacher jobs/assets/teacher]

The same prepared root (a generated world's crawl images in shards, phrase tables made by the phrase stage;
``bench/label.py``'s helpers) is labelled three times from scratch by ``pipeline.graph.run`` on an in-process Ray
with this machine's cores: one actor of 1 CPU, two actors of 1 CPU each, and one actor of 2 CPUs (Ray gives an
actor as many torch threads as CPUs). Each unit's own seconds (``LabelShard`` stats, in the ledger) measure the
actors while they work, so start-up (Ray, actor creation, loading the teacher) is left out: the aggregate rate
is ``workers * images / sum(unit seconds)`` (every actor is busy while units remain; the executor hands a unit
to whichever actor frees up). Prints a table, then as its last line one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import label as label_bench  # noqa: E402

from pipeline import graph  # noqa: E402
from pipeline.executor import init_ray  # noqa: E402
from pipeline.label import LabelConfig, LabelSettings  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from pipeline.ledger import Ledger  # noqa: E402
from pipeline.phrases import PhraseExtractor  # noqa: E402
from teacher.teacher import TeacherConfig  # noqa: E402

# (name, workers, CPUs per worker)
LAYOUTS = (("1 actor x 1 CPU", 1, 1), ("2 actors x 1 CPU", 2, 1), ("1 actor x 2 CPUs", 1, 2))


def label_rate(template: Path, work: Path, teacher: str, workers: int, cpus: int) -> dict:
    """Label a fresh copy of ``template`` with ``workers`` actors of ``cpus`` CPUs; the aggregate img/s."""
    root = work / f"w{workers}-c{cpus}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root)
    layout = Layout(str(root))
    settings = LabelSettings(TeacherConfig(checkpoint=teacher, device="cpu"), LabelConfig())
    run = graph.run(layout, "label", settings, workers=workers, cpus_per_worker=cpus, progress=False)
    if not run.complete:
        raise RuntimeError(f"label run with {workers} x {cpus} CPU did not complete: {run.table()}")
    ledger = Ledger(layout, run.stage)
    entries = [ledger.get(unit) for unit in ledger.units()]
    images = sum(entry["images"] for entry in entries)
    seconds = sum(entry["seconds"] for entry in entries)
    return {"images": images, "unit_seconds": seconds, "images_per_s": workers * images / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--teacher", default=str(label_bench.DEFAULT_TEACHER))
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    if cores < 2:
        parser.error("two actors need two cores")
    with tempfile.TemporaryDirectory(prefix="bench-actors-") as folder:
        work = Path(folder)
        samples = label_bench.world_samples(work / "world", 300)
        template = work / "template"
        label_bench.prepared_root(str(template), samples, args.images, args.shard_size, PhraseExtractor())
        init_ray(num_cpus=2)
        rates = {name: label_rate(template, work, args.teacher, w, c) for name, w, c in LAYOUTS}
    one, two, wide = (rates[name]["images_per_s"] for name, _, _ in LAYOUTS)
    figures = {
        "images": args.images,
        "shard_size": args.shard_size,
        "cores": cores,
        "one_actor_1cpu_images_per_s": one,
        "two_actors_1cpu_images_per_s": two,
        "one_actor_2cpu_images_per_s": wide,
        "two_actors_over_one": two / one,
        "two_actors_over_one_2cpu": two / wide,
    }
    print(f"{'layout':<20} {'img/s':>8}  units' seconds")
    for name, _, _ in LAYOUTS:
        print(f"{name:<20} {rates[name]['images_per_s']:>8.2f}  {rates[name]['unit_seconds']:.1f}")
    print(
        f"two actors / one (1 CPU each): {two / one:.3f}; two actors x 1 CPU / one x 2 CPUs: {two / wide:.3f}"
    )
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
