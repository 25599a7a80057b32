"""JPEG decoding into the BGR arrays the teacher takes: the label stage's decoder against PIL's.

    python bench/decode.py [--images 200] [--rounds 7] [--size 1333x800]

- ``decode_bgr``: ``pipeline.images.decode_bgr``, what the label stage runs (PIL reads the header and checks the
  size; libjpeg-turbo through simplejpeg decodes straight to BGR);
- ``pil``: ``pipeline.images.decode_rgb`` then ``glip.preprocess.bgr_from_rgb`` of the array, the stage's path
  before 2026-11-28 (PIL decodes to RGB, copies to its own image, to an array, then to BGR).

Each over the crawl images of a generated world (``jobs.world``: small drawn scenes, ~15 KB) and over the same
images enlarged to ``--size`` and re-encoded with noise (``bench/label_gpu.py``'s ``enlarged``: a GLIP-T input as
is, ~130 KB), in this thread, one after the other, ``--rounds`` times; a method's time is its best round (the
least disturbed). Checks that both give the same bytes for every image. Prints a table, then as its last line one
JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from label import world_samples  # noqa: E402
from label_gpu import enlarged  # noqa: E402

from glip.preprocess import bgr_from_rgb  # noqa: E402
from pipeline import images  # noqa: E402

METHODS = {
    "decode_bgr": lambda data: images.decode_bgr(data).array,
    "pil": lambda data: bgr_from_rgb(np.asarray(images.decode_rgb(data).image)),
}


def best_ms(jpegs: list[bytes], rounds: int) -> dict[str, float]:
    """Each method's best round over ``jpegs``, in ms an image; the methods alternate within a round."""
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(rounds):
        for name, decode in METHODS.items():
            began = time.perf_counter()
            for data in jpegs:
                decode(data)
            times[name].append(time.perf_counter() - began)
    return {name: min(seconds) / len(jpegs) * 1e3 for name, seconds in times.items()}


def identical(jpegs: list[bytes]) -> bool:
    return all(np.array_equal(METHODS["decode_bgr"](data), METHODS["pil"](data)) for data in jpegs)


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as folder:
        world = [sample.jpeg for sample in world_samples(Path(folder), args.images)]
    large = [enlarged(data, args.size, 90, 3.0, seed) for seed, data in enumerate(world[: args.large_images])]
    figures: dict = {"decoder": f"simplejpeg {images.simplejpeg.__version__}" if images.simplejpeg else "PIL"}
    for name, jpegs in (("world", world), ("large", large)):
        ms = best_ms(jpegs, args.rounds)
        figures[f"{name}_images"] = len(jpegs)
        figures[f"{name}_mean_kib"] = sum(map(len, jpegs)) / len(jpegs) / 1024
        figures[f"{name}_decode_bgr_ms"] = ms["decode_bgr"]
        figures[f"{name}_pil_ms"] = ms["pil"]
        figures[f"{name}_pil_over_decode_bgr"] = ms["pil"] / ms["decode_bgr"]
        figures[f"{name}_identical"] = identical(jpegs)
    figures["large_size"] = "x".join(map(str, args.size))
    return figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="world crawl images")
    parser.add_argument("--large-images", type=int, default=40, help="of them, enlarged")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--size", type=lambda text: tuple(int(side) for side in text.split("x")), default=(1333, 800)
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    figures = measure(parse_args(argv))
    print(f"decoder: {figures['decoder']}")
    print(f"{'images':<34} {'decode_bgr':>11} {'pil':>9} {'pil/decode_bgr':>15} {'same bytes':>11}")
    for name, what in (("world", "world crawl"), ("large", f"enlarged to {figures['large_size']}")):
        label = f"{what} ({figures[f'{name}_images']}, {figures[f'{name}_mean_kib']:.0f} KiB)"
        print(
            f"{label:<34} {figures[f'{name}_decode_bgr_ms']:>8.3f} ms {figures[f'{name}_pil_ms']:>6.3f} ms "
            f"{figures[f'{name}_pil_over_decode_bgr']:>15.2f} {str(figures[f'{name}_identical']):>11}"
        )
    print(
        json.dumps(
            {key: round(value, 4) if isinstance(value, float) else value for key, value in figures.items()}
        )
    )
    return 0 if figures["world_identical"] and figures["large_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
