"""Whether the label stage's host side keeps a device busy, measured here without one (``make bench``'s rows).

    python bench/host_feed.py [--rates 100,200] [--boxes 100] [--images 256] [--shard-size 128] [--repeat 8]
                              [--world-images 48] [--size 1333x800]

Prepares a folder as ``bench/label_gpu.py prepare`` does (GLIP-T sized JPEGs: the demo world's crawl images
enlarged to 1333x800 with noise; ``--wheels installed``, nothing fetched) in a temporary folder, then runs
``bench/label_gpu.py feed`` on it in this process: the label stage over a simulated device of each rate (its
docstring says how), the device's busy fraction and the stage's img/s at each. On this project's 2-core machine
the stage's thread and its four decoding threads share two cores with nothing else, so the figures are the
pessimistic side of a GPU host's (16 cores on the lent H200). ``--repeat 8`` makes shards of 1,024 images: a
shard's end and the next one's start (writing its outputs and committing, reading the next one's tables, decoding
its first batch) leave the device idle ~250 ms here, 5% of a 256-image shard at 100 img/s and 0.25% of a real
10,000-image one. Prints a table, then as its last line one JSON
object of the figures (``busy_at_<rate>``, ``images_per_s_at_<rate>``, every figure of ``feed`` beside them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_gpu  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="100,200", help="device img/s, comma-separated")
    parser.add_argument("--boxes", default="100", help="detections a pair, as a teacher's")
    parser.add_argument("--images", default="256", help="images prepared")
    parser.add_argument("--shard-size", default="128")
    parser.add_argument("--repeat", default="8", help="each shard as N copies of its samples")
    parser.add_argument("--world-images", default="48", help="distinct crawl images generated")
    parser.add_argument("--size", default="1333x800", help="WIDTHxHEIGHT of every image")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, folder: Path) -> dict:
    data = str(folder / "data")
    label_gpu.prepare(
        label_gpu.parse_args(
            ["prepare", "--out", data, "--images", args.images, "--shard-size", args.shard_size,
             "--world-images", args.world_images, "--size", args.size, "--wheels", "installed"]
        )
    )  # fmt: skip
    feed = ["feed", "--data", data, "--rates", args.rates, "--boxes", args.boxes, "--repeat", args.repeat]
    figures = label_gpu.run(label_gpu.parse_args(feed))
    for rate, row in figures["feed"].items():
        figures[f"busy_at_{rate}"] = row["busy"]
        figures[f"images_per_s_at_{rate}"] = row["images_per_s"]
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-host-feed-") as folder:
        figures = measure(args, Path(folder))
    print(
        f"the label stage over simulated devices: {figures['feed_images']} images a pass, "
        f"{figures['feed_boxes_per_pair']} boxes a pair, {figures['cpu_count']} CPUs ({figures['cpu']})"
    )
    for name, value, note in label_gpu.feed_rows(figures):
        print(f"{name:<28} {value:<16} {note}")
    print(json.dumps(label_gpu.rounded(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
