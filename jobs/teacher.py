"""Reproduce the embedded default teacher from scratch: generate the world, train the demo preset on its
human-annotated set in two stages (``RECIPE``, then ``CONTINUE_STEPS`` of a round's training config), evaluate on
the held-out split, and (with ``--install``) ship it as jobs/assets/teacher.

    make teacher                    # = python -m jobs.teacher --install
    python -m jobs.teacher --out demo-out/teacher --seed 0

The two stages are the ones the shipped teacher was trained with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from glip import checkpoint
from jobs import evaluate, train
from jobs import world as world_job

ASSET = Path(__file__).parent / "assets" / "teacher"
# The demo preset, text encoder frozen (so the shipped file holds only the vision and fusion weights). The
# classification loss trains alone for the first 2,700 steps: 2,500 with the head's tower skipped (the ResNet
# body and pyramid learn colour and shape; ~28 images/s), then 200 through the tower; then 100 steps in which
# the token loss reaches only the alignment, and 1,200 with every loss (~12 images/s). bench/RESULTS.md.
RECIPE = [
    "--preset",
    "demo",
    "--freeze-text",
    "--steps",
    "4000",
    "--batch-size",
    "8",
    "--set",
    "train.optim.lr=0.0006",
    "--set",
    "train.optim.warmup_steps=60",
    "--set",
    "train.max_negatives=12",
    "--set",
    "train.checkpoint_every=50",
    "--set",
    "train.pyramid_warmup_steps=2500",
    "--set",
    "train.class_warmup_steps=200",
    "--set",
    "train.alignment_warmup_steps=100",
]


# The second stage continues the first as a round's baseline does (``jobs.round.DEFAULT_TRAIN``: lr 2e-4, 20
# warm-up steps, 12 negatives, text frozen), for 1,000 steps on the same human set, from the first stage's
# float16 weights. The first stage stops far from where more steps stop paying (the continuation adds 8 AP and
# 12 APr), and a round's student only beats its baseline from a teacher near that point: from the first stage
# alone the baseline's gain from more steps on human data outweighs what pseudo-labels add (bench/RESULTS.md).
CONTINUE_STEPS = 1000


def install(trained: Path, target: Path = ASSET) -> None:
    """Ship ``trained`` as the embedded default (or save it at ``target``): float16 weights, with only the text
    layers training changed (the rest of the pretrained text encoder is read from its package)."""
    model, config = checkpoint.load(trained)
    _, document = checkpoint.read_config(trained)
    shutil.rmtree(target, ignore_errors=True)
    checkpoint.save(
        model,
        config,
        target,
        include_text=document.get("text_weights_included", True),
        dtype=torch.float16,
        metadata={
            "recipe": f"{' '.join(RECIPE)}; then {CONTINUE_STEPS} steps of jobs.round.DEFAULT_TRAIN",
            "source": "python -m jobs.teacher",
        },
    )


def train_teacher(world: Path, out: Path) -> Path:
    """Both stages on ``world``'s human set, under ``out``: ``RECIPE`` in ``run/``, its float16 weights in
    ``first-stage/``, then ``CONTINUE_STEPS`` of a round's training config in ``continued/``; returns the final
    checkpoint (resumed where a stage was stopped)."""
    from jobs.round import DEFAULT_TRAIN, human_sources  # jobs.round imports this module
    from student.train import train as train_run

    train.main(["--world", str(world), *RECIPE, "--out", str(out / "run")])
    first = out / "first-stage"
    install(out / "run" / "checkpoint", first)
    model_config, _ = checkpoint.read_config(first)
    config = dataclasses.replace(DEFAULT_TRAIN, steps=CONTINUE_STEPS)
    train_run(model_config, config, human_sources(world.resolve()), out / "continued", init_checkpoint=first)
    return out / "continued" / "checkpoint"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(
        prog="glip-engine teacher", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo-out/teacher")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--install", action="store_true", help=f"copy the trained checkpoint to {ASSET}")
    args = parser.parse_args(argv)
    out = Path(args.out)
    world = out / "world"
    if not (world / "world.json").is_file():
        world_job.main(["--out", str(world), "--seed", str(args.seed)])
    final = train_teacher(world, out)
    evaluate.main(["--checkpoint", str(final), "--world", str(world)])
    if args.install:
        install(final)
        print(json.dumps({"installed": str(ASSET)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
