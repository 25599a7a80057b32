"""Evaluate a GLIP checkpoint: COCO AP / AP50 (pycocotools), APr (the rare names) and grounding recall@1.

    python -m jobs.evaluate --checkpoint runs/teacher/checkpoint \
        --coco demo-out/world/annotations/eval_coco.json:demo-out/world/images/eval \
        --grounding demo-out/world/annotations/eval_grounding.json:demo-out/world/images/eval \
        --rare-names "red circle,orange star"

    python -m jobs.evaluate --checkpoint runs/teacher/checkpoint --world demo-out/world   # held-out split

APr is LVIS's: the AP over the rare names' categories of the detections made with every name in the prompt;
apr_prompt is the AP over the rare names prompted with the rare names alone. With ``--world`` the rare names
are the world's (world.json's ``rare_names``); ``--rare-names`` names them otherwise (or overrides them).
An official checkpoint (``.pth``) is evaluated with ``--official-config glip_t`` (a preset name), a json of
official config values or a reference config.json (``glip.checkpoint.load_any``). Prints one JSON object: ap,
apr, apr_prompt, ap50, r1 (null where not measured), images, seconds, rare_names.
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
from student.evaluate import EvalResult, evaluate


def world_eval_files(world: str | Path) -> tuple[str, str]:
    """``json:image root`` of a world's held-out COCO and grounding files."""
    world = Path(world)
    files = json.loads((world / "world.json").read_text())["files"]
    images = world / files["eval_images"]
    return f"{world / files['eval_coco']}:{images}", f"{world / files['eval_grounding']}:{images}"


def world_rare_names(world: str | Path) -> list[str]:
    """A world's rare names (world.json ``rare_names``); a world written before they existed raises."""
    manifest = json.loads((Path(world) / "world.json").read_text())
    if "rare_names" not in manifest:
        raise ValueError(
            f"{world}/world.json lists no rare_names: regenerate the world (python -m jobs.world)"
        )
    return list(manifest["rare_names"])


def evaluate_world(
    predictor: GlipPredictor,
    world: str | Path,
    batch_size: int = 8,
    limit: int | None = None,
    rare_names: list[str] | None = None,
    rare_prompt: bool = True,
) -> EvalResult:
    """AP, APr (the world's rare names unless ``rare_names``), the rare-prompt AP, AP50 and R@1 of
    ``predictor`` on a world's held-out split."""
    coco, grounding = world_eval_files(world)
    coco_json, _, root = coco.partition(":")
    rare = world_rare_names(world) if rare_names is None else rare_names
    return evaluate(
        predictor, coco_json, grounding.partition(":")[0], root, batch_size, limit, rare, rare_prompt
    )


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip-engine evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--official-config")
    parser.add_argument("--world", help="evaluate on this world's held-out split")
    parser.add_argument("--coco", help="COCO json[:image root]")
    parser.add_argument("--grounding", help="MDETR grounding json[:image root] (same images)")
    parser.add_argument(
        "--rare-names", type=_names, help="comma list of the rare category names (default: the world's)"
    )
    parser.add_argument(
        "--no-rare-prompt",
        action="store_true",
        help="skip the second pass, prompted with the rare names alone",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--device")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast (CUDA / bf16-capable CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = _parser().parse_args(argv)
    if not args.world and args.coco is None:
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
    rare_prompt = not args.no_rare_prompt
    if args.world:
        result = evaluate_world(
            predictor, args.world, args.batch_size, args.limit, args.rare_names, rare_prompt
        )
    else:
        coco_json, _, root = args.coco.partition(":")
        grounding_json = args.grounding.partition(":")[0] if args.grounding else None
        rare = args.rare_names or ()
        result = evaluate(
            predictor, coco_json, grounding_json, root or None, args.batch_size, args.limit, rare, rare_prompt
        )
    print(
        json.dumps(
            {
                **result.as_dict(),
                "images": result.images,
                "seconds": round(result.seconds, 1),
                "rare_names": list(result.rare_names),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
