"""A paste pool the size of a 24M crawl's through Ray Train: a two-step pasting run of a tiny model with a
synthetic pool of ``--objects`` objects (a 24M crawl kept at the demo's rate has ~44M) against the same run with
a small pool, in one process: the run's seconds and the machine's memory at its peak (``/proc/meminfo``, sampled
every 0.2 s, above what it used before the pool was built).

    python bench/pool_ray.py                       # 44M objects against 2M (~2.1 GB of pool against ~0.1)
    python bench/pool_ray.py --workers 2           # two DDP workers on this machine, one shared copy

The pool's objects point at the human images of a small generated world (so pasting reads real pixels); their
boxes, concepts and weights are random. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glip.config import tiny, with_overrides  # noqa: E402
from jobs.round import human_sources  # noqa: E402
from jobs.world import WorldOptions, generate_world  # noqa: E402
from student.paste import InstanceTable, PastePool  # noqa: E402
from student.ray_train import train_on_ray  # noqa: E402
from student.schedule import OptimConfig  # noqa: E402
from student.train import TrainConfig  # noqa: E402

MODEL = ["input.min_size=128", "input.max_size=128", "input.train_min_sizes=(128,)", "text.pad_to_max=False"]
TRAIN = TrainConfig(steps=2, batch_size=4, optim=OptimConfig(lr=1e-4, warmup_steps=1), checkpoint_every=2,
                    log_every=1, num_workers=0, max_negatives=5, amp=False, device="cpu")  # fmt: skip
CONCEPTS = 100_000


def _used() -> int:
    """Bytes the machine uses: MemTotal - MemAvailable."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


def synthetic_pool(objects: int, files: list[str], seed: int = 0) -> PastePool:
    """``objects`` objects, two an image, on ``files`` (128x128 images), random concepts and weights."""
    rng = np.random.default_rng(seed)
    images = objects // 2 + 1
    table = InstanceTable(
        files,
        [f"concept {i}" for i in range(CONCEPTS)],
        image_path=rng.integers(0, len(files), images).astype(np.int32),
        image_range=np.full((images, 2), -1, np.int64),
        image_pseudo=np.ones(images, bool),
        object_image=(np.arange(objects) // 2).astype(np.int32),
        object_box=np.tile(np.float32([[10, 10, 40, 44]]), (objects, 1)),
        object_concept=rng.integers(0, CONCEPTS, objects).astype(np.int32),
    )
    return PastePool(table, 1.0, 2, rng.random(objects) + 1.0)


def run(objects: int, world: Path, out: Path, workers: int) -> dict:
    sources = human_sources(world)
    files = sorted({record.image_path for record in sources[0].records})
    base = peak = _used()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _used())
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    pool = synthetic_pool(objects, files)
    sources = [dataclasses.replace(source, paste=pool) for source in sources]
    started = time.perf_counter()
    summary = train_on_ray(
        with_overrides(tiny(), MODEL), TRAIN, sources, out / f"run-{objects}", num_workers=1
    )
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    assert summary["step"] == TRAIN.steps, summary
    return {"objects": objects, "pool_bytes": pool.nbytes, "seconds": seconds, "peak_bytes": peak - base}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=44_000_000)
    parser.add_argument("--small", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP), all on this machine")
    args = parser.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="pool-ray-"))
    try:
        world = out / "world"
        generate_world(WorldOptions(out=str(world), seed=3, train_images=8, eval_images=2, crawl_images=4, leaks=1,
                                    dead_urls=1, image_size=(128, 128), object_size=(32, 64),
                                    objects_per_image=(1, 2)))  # fmt: skip
        small, large = run(args.small, world, out, args.workers), run(args.objects, world, out, args.workers)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"{'pool':<12} {'objects':>12} {'pool GiB':>9} {'run s':>8} {'machine peak GiB':>17}")
    for name, row in (("small", small), ("large", large)):
        print(f"{name:<12} {row['objects']:>12,} {row['pool_bytes'] / 2**30:>9.2f} {row['seconds']:>8.1f} "
              f"{row['peak_bytes'] / 2**30:>17.2f}")  # fmt: skip
    extra = (large["peak_bytes"] - small["peak_bytes"]) / max(large["pool_bytes"] - small["pool_bytes"], 1)
    figures = {
        "objects": args.objects,
        "workers": args.workers,
        "pool_gib": round(large["pool_bytes"] / 2**30, 2),
        "run_seconds": round(large["seconds"], 1),
        "small_run_seconds": round(small["seconds"], 1),
        "extra_seconds": round(large["seconds"] - small["seconds"], 1),
        "machine_peak_gib": round(large["peak_bytes"] / 2**30, 2),
        "extra_peak_per_pool_byte": round(extra, 2),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
