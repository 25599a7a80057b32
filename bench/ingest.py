"""Ingest throughput on loopback, the cost of a no-op re-run, and the seen-set at scale.

    python bench/ingest.py [--images 600] [--processes 2] [--threads 16] [--seen 10000000]
    python bench/ingest.py --images 40 --processes 1 --threads 4 --seen 100000   # a quick check, ~20 s

Measures, in one run: images/s of a full ingest of a crawl served by a loopback HTTP server (img2dataset
start-up included), the time of a re-run with no new partition relative to the full run, the time of a new
partition that repeats half of the first one's URLs, and the seen-set's load time and lookup rate at
``--seen`` uids. Prints a table, then as its last line one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# The loopback server lives with the tests; this script runs as `python bench/ingest.py` from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import graph, seen  # noqa: E402
from pipeline.ingest import IngestConfig  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from tests.hostile_server import HostileServer, encode, smooth_image  # noqa: E402


def _write_partition(folder: Path, name: str, urls: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    captions = [f"stock photo number {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), folder / f"{name}.parquet")


def _worker_rate(folder: Path) -> float:
    """URLs/s inside img2dataset's workers: all shards' rows over the span from first start to last end."""
    stats = [json.loads(path.read_text()) for path in folder.glob("*_stats.json")]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return sum(s["count"] for s in stats) / span


def _ingest(layout: Layout, config: IngestConfig) -> graph.StageRun:
    return graph.run(layout, "ingest", config, progress=False)


def _timed(function, *args) -> tuple[float, object]:
    began = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - began, result


def ingest_figures(work: Path, images: int, processes: int, threads: int) -> dict[str, float]:
    """Full run, no-op re-run and half-new partition against a loopback server serving ``images`` JPEGs."""
    with HostileServer() as server:
        bodies = [encode(smooth_image(i, (320, 240)), quality=85) for i in range(images + images // 2)]
        urls = [server.add(f"b{i}.jpg", data) for i, data in enumerate(bodies)]
        crawl, layout = work / "crawl", Layout(str(work / "out"))
        config = IngestConfig(
            crawl=str(crawl),
            processes_count=processes,
            thread_count=threads,
            number_sample_per_shard=100,
            timeout=10,
            allow_hosts=(f"127.0.0.1:{server.port}",),
        )
        _write_partition(crawl, "day1", urls[:images])
        full_s, full = _timed(_ingest, layout, config)
        noop_s, noop = _timed(_ingest, layout, config)
        _write_partition(crawl, "day2", urls[images // 2 : images] + urls[images:])
        half_s, half = _timed(_ingest, layout, config)
    assert full.complete and not noop.results and half.complete
    assert half.results["day2"].stats["counts"]["seen_before"] == images // 2
    successes = full.results["day1"].stats["counts"]["success"]
    return {
        "images": images,
        "successes": successes,
        "full_run_s": full_s,
        "images_per_s": successes / full_s,
        "worker_urls_per_s": _worker_rate(Path(layout.image_folder("day1"))),
        "noop_rerun_s": noop_s,
        "noop_rerun_ratio": noop_s / full_s,
        "half_new_partition_s": half_s,
        "half_new_ratio": half_s / full_s,
        "mean_image_bytes": float(np.mean([len(b) for b in bodies])),
    }


def seen_figures(work: Path, total: int, units: int = 100, queries: int = 1_000_000) -> dict[str, float]:
    """Seen-set of ``total`` uids stored as ``units`` files: load time, lookups/s, URL hashing rate."""
    rng = np.random.default_rng(0)
    fs = fsspec.filesystem("file")
    values = rng.integers(0, 2**64 - 1, total, dtype=np.uint64, endpoint=True)
    paths = [str(work / "seen" / f"u{i:04d}.npy") for i in range(units)]
    for path, chunk in zip(paths, np.array_split(values, units)):
        seen.write_uids(fs, path, chunk)
    load_s, members = _timed(seen.SeenSet.load, fs, paths)
    probe = np.concatenate(
        [rng.choice(values, queries // 2), rng.integers(0, 2**63, queries // 2, np.uint64)]
    )
    members.contains(probe[:10])  # the merge happens on the first lookup; time lookups alone
    lookup_s, found = _timed(members.contains, probe)
    assert found[: queries // 2].all()
    urls = [f"https://cdn.example.com/images/{i}/photo.jpg" for i in range(200_000)]
    hash_s, _ = _timed(seen.url_uids, urls)
    return {
        "seen_uids": total,
        "seen_load_s": load_s,
        "seen_lookups_per_s": queries / lookup_s,
        "url_uids_per_s": len(urls) / hash_s,
        "seen_bytes": total * 8,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seen", type=int, default=10_000_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as folder:
        figures = ingest_figures(Path(folder), args.images, args.processes, args.threads)
        figures |= seen_figures(Path(folder), args.seen)
    rows = [
        (
            "full ingest",
            f"{figures['images']} images in {figures['full_run_s']:.1f} s",
            f"{figures['images_per_s']:.0f} images/s (worker start-up included)",
        ),
        (
            "no-op re-run",
            f"{figures['noop_rerun_s']:.3f} s",
            f"ratio to full run {figures['noop_rerun_ratio']:.4f}",
        ),
        (
            "half-new partition",
            f"{figures['half_new_partition_s']:.1f} s",
            f"ratio to full run {figures['half_new_ratio']:.2f}",
        ),
        (
            "seen-set load",
            f"{figures['seen_uids']:,} uids in {figures['seen_load_s']:.2f} s",
            f"{figures['seen_bytes'] / 2**20:.0f} MiB",
        ),
        (
            "seen-set lookup",
            f"{figures['seen_lookups_per_s'] / 1e6:.1f} M lookups/s",
            "searchsorted, 1M queries",
        ),
        ("url -> uid", f"{figures['url_uids_per_s'] / 1e6:.2f} M urls/s", "sha256, first 8 bytes"),
    ]
    for name, value, note in rows:
        print(f"{name:<20} {value:<36} {note}")
    print(
        json.dumps(
            {key: round(value, 4) if isinstance(value, float) else value for key, value in figures.items()}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
