"""Held-out AP per category name of one or more checkpoints on a world (the all-names prompt, bf16 where the
CPU has it), the world's rare names first: what a change in APr is made of.

    python bench/per_name_ap.py --world demo-out/world --checkpoints jobs/assets/teacher runs/student/checkpoint

Prints a table (a row per name: its human train images, then each checkpoint's AP) and, last, one JSON line:
per checkpoint, the AP of every name and the means over the rare and the other names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO

from glip import checkpoint
from glip.predictor import GlipPredictor
from student.data import load_coco_detection, read_image
from student.metrics import coco_ap, coco_detections, quiet


def per_name_ap(predictor: GlipPredictor, coco_json: Path, image_root: Path, batch_size: int = 8) -> dict:
    """AP of each category of ``coco_json``, from one pass of the all-names prompt."""
    records, names = load_coco_detection(coco_json, image_root)
    coco = quiet(COCO, str(coco_json))
    ids = np.asarray(sorted(coco.getCatIds()))
    detections: list[dict] = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        found = predictor.predict_vocabulary([read_image(r.image_path) for r in batch], list(names))
        for record, result in zip(batch, found, strict=True):
            categories = ids[result.phrase_indices.numpy()]
            detections += coco_detections(
                record.image_id, result.boxes.numpy(), result.scores.numpy(), categories
            )
    return {name: coco_ap(coco, detections, None, [int(i)]).ap for name, i in zip(names, ids, strict=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", required=True)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    args = parser.parse_args(argv)
    world = Path(args.world)
    manifest = json.loads((world / "world.json").read_text())
    files, rare = manifest["files"], manifest.get("rare_names", [])
    per_name = manifest.get("per_name", {})
    figures = {}
    for path in args.checkpoints:
        model, config, _ = checkpoint.load_any(path)
        predictor = GlipPredictor(model, config, amp_dtype=torch.bfloat16)
        aps = per_name_ap(predictor, world / files["eval_coco"], world / files["eval_images"])
        common = [ap for name, ap in aps.items() if name not in rare]
        figures[path] = {"names": aps, "rare_mean": float(np.mean([aps[n] for n in rare])) if rare else None,
                         "other_mean": float(np.mean(common)) if common else None}  # fmt: skip
    names = [*rare, *(n for n in figures[args.checkpoints[0]]["names"] if n not in rare)]
    print(f"{'name':18} {'train':>5} " + " ".join(f"{i:>7}" for i in range(len(args.checkpoints))))
    for name in names:
        train = per_name.get(name, {}).get("train_images", "")
        mark = "*" if name in rare else " "
        print(
            f"{mark}{name:17} {train:>5} "
            + " ".join(f"{figures[c]['names'][name]:7.3f}" for c in args.checkpoints)
        )
    for key in ("rare_mean", "other_mean"):
        print(f"{key:24}" + " ".join(f"{figures[c][key] or 0:7.3f}" for c in args.checkpoints))
    for index, path in enumerate(args.checkpoints):
        print(f"{index}: {path}")
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
