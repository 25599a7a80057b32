"""Train a GLIP on COCO detection and MDETR-style grounding data; resumes when the run folder exists.

    python -m jobs.train --preset demo --out runs/teacher \
        --detection demo-out/world/annotations/train_coco.json:demo-out/world/images/train \
        --grounding demo-out/world/annotations/train_grounding.json:demo-out/world/images/train \
        --steps 1500 --batch-size 8 --freeze-text

    python -m jobs.train --world demo-out/world --preset demo --out runs/teacher   # the world's human set

    python -m jobs.train --world demo-out/world --out runs/t --set loss.weight_class=1.0 \
        --train class_warmup_steps=200 --train alignment_warmup_steps=100   # class loss first (see below)

    python -m jobs.train --world demo-out/world --out runs/t --steps 4000 --set body=resnet \
        --set loss.weight_class=1.0 --set loss.class_targets=words --train pyramid_warmup_steps=2500 \
        --train class_warmup_steps=200 --train alignment_warmup_steps=100   # the shipped teacher's phases

Each data argument is ``JSON[:IMAGE_ROOT]`` (image root defaults to the json's folder). ``--set key=value``
overrides the model config (e.g. ``--set head.num_convs=3``), ``--train key=value`` the training config
(e.g. ``--train optim.lr=5e-4``). Killing the job and starting the same command again continues from the
last checkpoint. With ``--eval-coco`` the trained model is evaluated at the end.

``--set loss.weight_class=1.0`` turns on the official classification loss (the legacy class conv;
``--set loss.class_targets=words`` makes it predict the words of the names). ``pyramid_warmup_steps`` trains it
alone with the head's tower skipped (the vision body and pyramid learn the categories, at a third of a step's
cost), ``class_warmup_steps`` then trains it alone through the tower, and ``alignment_warmup_steps`` keeps the
token loss's gradient out of the tower for a while (bench/RESULTS.md, sessions 3 and 4, says why).
``--set body=resnet`` swaps the Swin body for a ResNet of basic blocks, which learns shape from scratch sooner.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from glip.config import preset, with_overrides
from student.data import load_coco_detection, load_grounding
from student.schedule import OptimConfig
from student.train import Source, TrainConfig, train


def _split(argument: str) -> tuple[str, str | None]:
    json_path, _, root = argument.partition(":")
    return json_path, root or None


def _train_config(overrides: list[str], base: TrainConfig) -> TrainConfig:
    values = dataclasses.asdict(base)
    for item in overrides:
        key, _, raw = item.partition("=")
        node, parts = values, key.split(".")
        for part in parts[:-1]:
            node = node[part]
        if parts[-1] not in node:
            raise SystemExit(f"unknown training key {key!r}; valid: {sorted(node)}")
        value = json.loads(raw) if raw not in {"true", "false"} else raw == "true"
        current = node[parts[-1]]
        node[parts[-1]] = value if current is None or value is None else type(current)(value)
    values["optim"] = OptimConfig(**values["optim"])
    return TrainConfig(**values)


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
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="model config key=value")
    parser.add_argument(
        "--train", dest="train_overrides", action="append", default=[], help="training key=value"
    )
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
    args = build_parser().parse_args(argv)
    config = with_overrides(preset(args.preset), args.overrides)
    base = TrainConfig(freeze_text=args.freeze_text)
    if args.steps:
        base = dataclasses.replace(base, steps=args.steps)
    if args.batch_size:
        base = dataclasses.replace(base, batch_size=args.batch_size)
    train_config = _train_config(args.train_overrides, base)
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
