"""Train a GLIP on COCO detection and MDETR-style grounding data; resumes when the run folder exists.

    python -m jobs.train --preset demo --out runs/teacher \
        --detection demo-out/world/annotations/train_coco.json:demo-out/world/images/train \
        --grounding demo-out/world/annotations/train_grounding.json:demo-out/world/images/train \
        --steps 1500 --batch-size 8 --freeze-text

    python -m jobs.train --world demo-out/world --preset demo --out runs/teacher   # the world's human set

    python -m jobs.train --world demo-out/world --out runs/t --set model.loss.weight_class=1.0 \
        --set train.class_warmup_steps=200 --set train.alignment_warmup_steps=100   # class loss first (see below)

    python -m jobs.train --world demo-out/world --out runs/t --steps 4000 --set model.body=resnet \
        --set model.loss.weight_class=1.0 --set model.loss.class_targets=words \
        --set train.pyramid_warmup_steps=2500 --set train.class_warmup_steps=200 \
        --set train.alignment_warmup_steps=100   # the shipped teacher's phases

Each data argument is ``JSON[:IMAGE_ROOT]`` (image root defaults to the json's folder). ``--set
model.KEY=VALUE`` overrides the model config (``glip.config.GlipConfig``, e.g. ``--set model.head.num_convs=3``),
``--set train.KEY=VALUE`` the training config (``student.train.TrainConfig``, e.g. ``--set train.optim.lr=5e-4``);
values are typed by the config fields, and an unknown key is an error that lists the valid ones. ``--steps``,
``--batch-size`` and ``--freeze-text`` are shortcuts for train keys, applied before the ``--set`` items. Killing
the job and starting the same command again continues from the last checkpoint.

``--set model.loss.weight_class=1.0`` turns on the official classification loss (the legacy class conv;
``--set model.loss.class_targets=words`` makes it predict the words of the names). ``train.pyramid_warmup_steps``
trains it alone with the head's tower skipped (the vision body and pyramid learn the categories, at a third of
a step's cost), ``train.class_warmup_steps`` then trains it alone through the tower, and
``train.alignment_warmup_steps`` keeps the token loss's gradient out of the tower for a while (bench/RESULTS.md,
sessions 3 and 4, says why). ``--set model.body=resnet`` swaps the Swin body for a ResNet of basic blocks,
which learns shape from scratch sooner.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from glip.config import PRESETS, preset
from jobs._settings import add_set_argument, apply_sets_or_exit
from student.data import load_coco_detection, load_grounding
from student.train import Source, TrainConfig, train

SECTIONS = ("model", "train")  # --set model.KEY=VALUE: GlipConfig; --set train.KEY=VALUE: TrainConfig


def _split(argument: str) -> tuple[str, str | None]:
    json_path, _, root = argument.partition(":")
    return json_path, root or None


def world_sources(world: str | Path) -> tuple[list[str], list[str]]:
    """The ``--detection`` / ``--grounding`` arguments of a world folder's human-annotated training set."""
    world = Path(world)
    files = json.loads((world / "world.json").read_text())["files"]
    images = world / files["train_images"]
    return [f"{world / files['train_coco']}:{images}"], [f"{world / files['train_grounding']}:{images}"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip-engine train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="run folder (checkpoint/, train_state.pt, metrics.jsonl)"
    )
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    add_set_argument(parser, SECTIONS)
    parser.add_argument("--world", help="train on this world's human-annotated set")
    parser.add_argument("--detection", action="append", default=[], help="COCO json[:image root]")
    parser.add_argument("--grounding", action="append", default=[], help="MDETR grounding json[:image root]")
    parser.add_argument("--init", help="start from this checkpoint folder (ignored when resuming)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--freeze-text", action="store_true", help="keep the pretrained text encoder fixed")
    parser.add_argument("--stop-at-step", type=int, help="stop early at this step (the run can be resumed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    shortcuts = {"steps": args.steps, "batch_size": args.batch_size, "freeze_text": args.freeze_text or None}
    items = [f"train.{key}={value}" for key, value in shortcuts.items() if value is not None] + args.sets
    configs = apply_sets_or_exit(parser, items, {"model": preset(args.preset), "train": TrainConfig()})
    config, train_config = configs["model"], configs["train"]
    detection, grounding = list(args.detection), list(args.grounding)
    if args.world:
        world_detection, world_grounding = world_sources(args.world)
        detection, grounding = detection + world_detection, grounding + world_grounding
    if not detection and not grounding:
        raise SystemExit("no training data: give --world, --detection or --grounding")
    sources = []
    for argument in detection:
        records, names = load_coco_detection(*_split(argument))
        sources.append(Source(records, names))
    for argument in grounding:
        sources.append(Source(load_grounding(*_split(argument))))
    summary = train(config, train_config, sources, args.out, args.init, args.stop_at_step)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
