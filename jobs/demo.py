"""The main job on the embedded default: world -> teacher -> evaluate -> ingest -> phrases -> label -> quality.

    make demo                                   # = python -m jobs.demo
    make demo DEMO_ARGS="--seed 3 --crawl-images 200"

Options not listed below go to the world generator (``python -m jobs.world --help``). The teacher is the
shipped embedded default (``jobs/assets/teacher``, trained by ``make teacher``) unless ``--teacher`` names
another checkpoint folder; with ``--train-teacher`` it is trained here first (tens of minutes on 2 cores).
The crawl is served by a loopback HTTP server and ingested with img2dataset exactly as a web crawl would be.
Everything lands in ``--out`` (default demo-out); metrics in ``demo-out/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from jobs import teacher as teacher_job
from jobs import world as world_job
from jobs._loopback import ImageServer
from pipeline import graph
from pipeline.layout import Layout

logger = logging.getLogger("jobs.demo")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip-engine demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--teacher", help="teacher checkpoint folder (default: the shipped one)")
    parser.add_argument("--train-teacher", action="store_true", help="train the teacher here first")
    parser.add_argument("--workers", type=int, default=1, help="teacher actors")
    parser.add_argument("--threshold", type=float, default=0.5, help="pseudo-label score threshold")
    parser.add_argument("--eval-limit", type=int, help="evaluate the teacher on the first N held-out images")
    return parser


def _teacher(args, world: Path, out: Path) -> Path:
    if args.teacher:
        return Path(args.teacher)
    if not args.train_teacher and (teacher_job.ASSET / "config.json").is_file():
        return teacher_job.ASSET
    from jobs import teacher, train

    logger.info(
        "training the teacher on the world's human-annotated set (make teacher reproduces the shipped one)"
    )
    train.main(["--world", str(world), *teacher.RECIPE, "--out", str(out / "teacher")])
    return out / "teacher" / "checkpoint"


def _evaluate(teacher: Path, world: Path, limit: int | None) -> dict:
    """AP, APr (the world's rare names), the rare-prompt AP, AP50 and R@1 on the held-out split; a metric
    that could not be measured is an error, never a 0."""
    from glip.checkpoint import load_any
    from glip.predictor import GlipPredictor
    from jobs.evaluate import evaluate_world

    model, config, _ = load_any(teacher)
    result = evaluate_world(GlipPredictor(model, config, amp_dtype=torch.bfloat16), world, 8, limit)
    return {key: round(value, 4) for key, value in result.as_dict("teacher_", strict=True).items()}


def _ingest(world: Path, layout: Layout, base_url: str) -> dict:
    from pipeline.ingest import IngestConfig

    files = json.loads((world / "world.json").read_text())["files"]
    config = IngestConfig(
        crawl=str(world / "crawl"),
        allow_hosts=(base_url.removeprefix("http://"),),
        number_sample_per_shard=200,
        processes_count=2,
        thread_count=16,
        eval_sets=(str(world / files["eval_coco"]),),
    )
    result = graph.run(layout, "ingest", config, progress=False)
    print(result.table(), flush=True)
    if result.failed:
        raise SystemExit(f"ingest failed: {result.failed}")
    return result.totals("counts")


def _label(layout: Layout, teacher: Path, world: Path, workers: int, threshold: float) -> dict:
    from pipeline.exports import read_labels
    from pipeline.label import LabelConfig, LabelSettings
    from pipeline.phrases import PhraseConfig
    from pipeline.quality import quality
    from teacher.teacher import TeacherConfig

    settings = LabelSettings(TeacherConfig(checkpoint=str(teacher)), LabelConfig())
    phrases = graph.run(layout, "phrases", PhraseConfig(), progress=False)
    labels = graph.run(layout, "label", settings, workers=workers, progress=False)
    if phrases.failed or labels.failed:
        raise SystemExit(f"units failed: phrases {phrases.failed}, labels {labels.failed}")
    truth = json.loads((world / "crawl_truth.json").read_text())["samples"]
    verified = set(json.loads((world / "world.json").read_text())["verified_uids"])
    measured = {
        uid: entry for uid, entry in truth.items() if uid not in verified
    }  # the verified sample is kept apart
    report = quality(read_labels(layout, settings.folder, threshold), measured).to_dict()
    return {
        "pseudo_precision": report.get("precision"),
        "pseudo_recall": report.get("recall"),
        "pseudo_boxes": report.get("boxes"),
        "label_teacher": settings.folder,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args, world_argv = _parser().parse_known_args(argv)
    out = Path(args.out)
    began = time.perf_counter()
    summary: dict = {}
    world = out / "world"
    shutil.rmtree(
        out / "root", ignore_errors=True
    )  # the demo shows one whole run; real roots are incremental
    layout = Layout(str(out / "root"))
    with ImageServer(out) as server:
        options = world_job.build_parser().parse_args(
            [*world_argv, "--out", str(world), "--base-url", server.base_url]
        )
        manifest = world_job.generate_world(world_job.WorldOptions(**vars(options)))
        server.point_at(world / manifest["files"]["crawl_images"])
        summary["world"] = manifest["counts"]
        teacher = _teacher(args, world, out)
        summary.update(_evaluate(teacher, world, args.eval_limit))
        print(
            f"teacher {teacher}: AP {summary['teacher_ap']:.3f}  APr {summary['teacher_apr']:.3f}  "
            f"AP50 {summary['teacher_ap50']:.3f}  R@1 {summary['teacher_r1']:.3f}",
            flush=True,
        )
        summary["ingest"] = _ingest(world, layout, server.base_url)
    summary.update(_label(layout, teacher, world, args.workers, args.threshold))
    summary["seconds"] = round(time.perf_counter() - began, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    print(f"pseudo-labels: precision {summary['pseudo_precision']}  recall {summary['pseudo_recall']}")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
