"""What a pasting round holds of a crawl's pseudo-labels, on a labelled root, and what that comes to at 24M crawl
images: the records held whole (``load_pseudo_labels``: what a round that draws whole pseudo-labelled images holds,
and what a pasting round held before its pool was streamed) against the paste pool streamed from the shards
(``paste_pool(iter_pseudo_labels(...))``: what a pasting round holds now). Both as the round reads them: its keep
rule, its verified sample left out, the records with its ignore band and unlabelled phrases.

    python bench/pool_memory.py --root demo-out/root              # round 0's teacher, threshold and world

Bytes are ``tracemalloc``'s (Python objects and numpy arrays) in this process, after a garbage collection; the
pickled bytes are about what Ray Train's workers are sent. The pool's figures are the crawl's share (a pool of the human
objects alone is measured and taken off). The figures per kept image are scaled to 24M crawl images kept at this
root's rate. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import sys
import time
import tracemalloc
from pathlib import Path

# Run as `python bench/pool_memory.py` from anywhere: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.round import human_sources  # noqa: E402
from pipeline.exports import Keep, iter_labels  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from student.paste import paste_pool  # noqa: E402
from student.pseudo import iter_pseudo_labels, load_pseudo_labels  # noqa: E402

CRAWL = 24_000_000
_GIB = 2**30


def _held() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="a labelled root with a finished round 0 (make demo's)")
    parser.add_argument("--world", help="the world of its human set (default: the root's sibling world/)")
    parser.add_argument("--round", type=int, default=0, help="the round whose teacher and keep rule to read")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    world = Path(args.world) if args.world else root.parent / "world"
    lineage = json.loads((root / f"rounds/r{args.round}/lineage.json").read_text())
    layout, folder = Layout(str(root)), lineage["labels"]["folder"]
    config = lineage["round_config"]
    keep = Keep(lineage["threshold"]["threshold"], config["phrase_best"])
    exclude = set(json.loads((root / f"rounds/r{args.round}/calibration.json").read_text())["uids"])
    ignore_low = (
        config["ignore_low"]
        if config["ignore_low"] is not None and config["ignore_low"] < keep.floor
        else None
    )
    reference = [(source.records, source.names) for source in human_sources(world, config["human_negatives"])]
    shards = [table.num_rows for _, table in iter_labels(layout, folder)]
    labelled = sum(shards)

    def pool_of(records):
        return paste_pool(records, config["paste"] or 0.5, config["paste_per_image"], reference,
                          config["paste_repeat"], human=reference)  # fmt: skip

    tracemalloc.start()
    base = _held()
    started = time.perf_counter()
    records = load_pseudo_labels(layout, folder, keep, exclude, ignore_low, config["unlabelled_phrases"])
    records_seconds = time.perf_counter() - started
    records_held = _held() - base
    records_pickled = len(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL))
    kept = len(records)
    objects = sum(len(record.boxes) for record in records)
    del records
    base = _held()  # what reading the records left behind (caches) is not the human pool's
    human_pool = pool_of([])  # the human objects alone: what every pool holds whatever the crawl
    human_held = _held() - base
    human_objects = len(human_pool.instances)
    human_pickled = len(pickle.dumps(human_pool, protocol=pickle.HIGHEST_PROTOCOL))
    human_arrays = human_pool.nbytes
    del human_pool
    base = _held()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    pool = pool_of(iter_pseudo_labels(layout, folder, keep, exclude))
    pool_seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - base - human_held
    pool_held = _held() - base - human_held
    pool_pickled = len(pickle.dumps(pool, protocol=pickle.HIGHEST_PROTOCOL)) - human_pickled
    pool_arrays = pool.nbytes - human_arrays
    tracemalloc.stop()
    if not kept:
        raise SystemExit(f"{root}: no kept pseudo-label under {keep}")
    crawl_objects = len(pool.instances) - human_objects
    at_scale = CRAWL * kept / labelled  # kept images of a 24M crawl at this root's rate

    def scaled(total: float) -> float:
        return total / kept * at_scale / _GIB

    rows = [
        ("records held (load_pseudo_labels)", records_held, scaled(records_held)),
        ("records pickled", records_pickled, scaled(records_pickled)),
        ("pool of the crawl's objects, streamed", pool_held, scaled(pool_held)),
        ("  its arrays alone (nbytes)", pool_arrays, scaled(pool_arrays)),
        ("pool pickled", pool_pickled, scaled(pool_pickled)),
    ]
    print(f"root {root}: {labelled} labelled images, {kept} kept under {keep} ({objects} kept boxes, "
          f"{crawl_objects} pasteable), {human_objects} human objects ({human_held:,} B)")  # fmt: skip
    print(f"{'what':<40} {'bytes':>12} {'per kept image':>15} {'at 24M crawl (GiB)':>19}")
    for name, total, gib in rows:
        print(f"{name:<40} {total:>12,} {total / kept:>15.1f} {gib:>19.1f}")
    print(f"peak while streaming the pool: {peak - pool_held:,} B above the pool (one shard's rows at a time: "
          f"{labelled / len(shards):.0f} labelled images a shard here)")  # fmt: skip
    print(f"read: records {records_seconds:.1f} s, streamed pool {pool_seconds:.1f} s")
    figures = {
        "labelled_images": labelled,
        "kept_images": kept,
        "pasteable_objects": crawl_objects,
        "records_bytes_per_image": round(records_held / kept, 1),
        "pool_bytes_per_image": round(pool_held / kept, 1),
        "pool_bytes_per_object": round(pool_held / max(crawl_objects, 1), 1),
        "pool_array_bytes_per_object": round(pool_arrays / max(crawl_objects, 1), 1),
        "pool_over_records": round(pool_held / records_held, 4),
        "records_gib_at_24m": round(scaled(records_held), 2),
        "pool_gib_at_24m": round(scaled(pool_held), 2),
        "pool_pickled_gib_at_24m": round(scaled(pool_pickled), 2),
        "stream_peak_mib": round((peak - pool_held) / 2**20, 2),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
