"""Evaluate a GLIP checkpoint: COCO AP / AP50 (pycocotools) and grounding recall@1.

    python -m jobs.evaluate --checkpoint runs/teacher/checkpoint \
        --coco demo-out/world/annotations/eval_coco.json:demo-out/world/images/eval \
        --grounding demo-out/world/annotations/eval_grounding.json:demo-out/world/images/eval

    python -m jobs.evaluate --checkpoint runs/teacher/checkpoint --world demo-out/world   # held-out split

An official checkpoint (``.pth``) is evaluated with ``--official-config glip_t`` (a preset name), a json of
official config values or a reference config.json (``glip.checkpoint.load_any``). Prints one JSON object: ap,
ap50, r1, images, seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from glip import checkpoint
from glip.predictor import GlipPredictor
from student.evaluate import evaluate


def world_eval_files(world: str | Path) -> tuple[str, str]:
    world = Path(world)
    files = json.loads((world / "world.json").read_text())["files"]
    images = world / files["eval_images"]
    return f"{world / files['eval_coco']}:{images}", f"{world / files['eval_grounding']}:{images}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(
        prog="glip-engine evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--official-config")
    parser.add_argument("--world", help="evaluate on this world's held-out split")
    parser.add_argument("--coco", help="COCO json[:image root]")
    parser.add_argument("--grounding", help="MDETR grounding json[:image root] (same images)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--device")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast (CUDA / bf16-capable CPU)")
    args = parser.parse_args(argv)
    coco, grounding = args.coco, args.grounding
    if args.world:
        coco, grounding = world_eval_files(args.world)
    if coco is None:
        raise SystemExit("give --coco or --world")
    try:
        model, config, _ = checkpoint.load_any(args.checkpoint, args.official_config)
    except checkpoint.MissingOfficialConfigError:
        raise SystemExit(
            f"{args.checkpoint} is an official checkpoint: give --official-config (a preset name such as "
            "glip_t, or a json of official config values, or a reference config.json)"
        ) from None
    predictor = GlipPredictor(
        model, config, device=args.device, amp_dtype=None if args.fp32 else torch.bfloat16
    )
    coco_json, _, root = coco.partition(":")
    grounding_json = grounding.partition(":")[0] if grounding else None
    result = evaluate(predictor, coco_json, grounding_json, root or None, args.batch_size, args.limit)
    print(
        json.dumps(
            {
                "ap": result.ap,
                "ap50": result.ap50,
                "r1": result.recall_at_1,
                "images": result.images,
                "seconds": round(result.seconds, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
