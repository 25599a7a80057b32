"""Student training speed: images/s of the training loop on the embedded default, after warm-up.

    python bench/train_speed.py [--steps 14] [--warmup 4] [--batch-size 8] [--threads 2]

Trains the demo preset from the shipped teacher (``jobs/assets/teacher``, as a round's student starts) on a
generated world's human-annotated set with ``jobs.train`` (the real loop: data loading and augmentation,
forward, losses, backward, AdamW; bf16 autocast where the CPU has it), logging every step. The loop logs its
cumulative rate ``images / seconds since the start``; from two log lines the rate between them follows, so the
first ``--warmup`` steps (first calls of each shape) are left out. Prints a table, then as its last line one
JSON object of the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glip.predictor import autocast_supported  # noqa: E402
from jobs import train as train_job  # noqa: E402
from jobs.world import WorldOptions, generate_world  # noqa: E402

TEACHER = REPO / "jobs" / "assets" / "teacher"


def rate_between(first: dict, last: dict, batch: int) -> float:
    """img/s between two metrics lines of one run: each holds its ``step`` and ``images_per_s`` since the
    start, so the time elapsed at a line is ``step * batch / images_per_s``."""
    elapsed = [line["step"] * batch / line["images_per_s"] for line in (first, last)]
    return (last["step"] - first["step"]) * batch / (elapsed[1] - elapsed[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the rate")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.steps:
        parser.error("need 0 < --warmup < --steps")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        world = Path(folder) / "world"
        generate_world(WorldOptions(out=str(world), train_images=64, eval_images=0, crawl_images=0, leaks=0,
                                    dead_urls=0))  # fmt: skip
        out = Path(folder) / "run"
        command = ["--world", str(world), "--preset", "demo", "--init", str(TEACHER), "--out", str(out),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--set", "train.log_every=1", "--set", f"train.checkpoint_every={args.steps}"]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            train_job.main(command)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {line["step"]: line for line in lines}
    rate = rate_between(by_step[args.warmup], by_step[args.steps], args.batch_size)
    figures = {
        "train_images_per_s": rate,
        "train_steps_measured": args.steps - args.warmup,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "preset": "demo",
        "precision": "bfloat16" if autocast_supported(torch.device("cpu"), torch.bfloat16) else "float32",
        "final_loss": lines[-1]["loss"],
    }
    print(
        f"student training, demo preset, batch {args.batch_size}, {figures['precision']}, {args.threads} threads"
    )
    print(f"{'images/s':<12} {rate:.2f}  (steps {args.warmup + 1}-{args.steps})")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
