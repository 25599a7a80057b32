"""The main job on the embedded default, the whole loop: world -> ingest -> round(s): label, calibrate, student
and baseline, evaluate, promote, report.

    make demo                                   # = python -m jobs.demo
    make demo DEMO_ARGS="--seed 3 --rounds 2"
    make demo DEMO_ARGS="--set train.steps=600 --set round.margin=0.02 --uniform"

Options not listed below go to the world generator (``python -m jobs.world --help``); ``--set round.KEY`` and
``--set train.KEY`` go to every round (``python -m jobs.round --help``). The first round's teacher is the
shipped embedded default (``jobs/assets/teacher``, trained by ``make teacher``) unless ``--teacher`` names
another checkpoint folder; with ``--train-teacher`` it is trained here first (tens of minutes on 2 cores).
The crawl is served by a loopback HTTP server and ingested with img2dataset exactly as a web crawl would be.
The server listens on ``--port`` (default 8765; a free one, with a warning, when that is taken): the port is
part of every crawl URL, hence of every sample's uid, so two runs on one port give the same figures, student
included.
Everything lands in ``--out`` (default demo-out): the engine's root in ``root/``, each round in
``root/rounds/r<k>/`` (its report.html among them), the figures in ``summary.json`` (those of the last round at
the top, every round under ``rounds``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from jobs import round as round_job
from jobs import teacher as teacher_job
from jobs import world as world_job
from jobs._loopback import ImageServer
from jobs._settings import add_set_argument, apply_sets_or_exit
from pipeline import graph
from pipeline.layout import Layout

logger = logging.getLogger("jobs.demo")
DEFAULT_PORT = int(world_job.WorldOptions.base_url.rsplit(":", 1)[1])  # the world's own default URLs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip-engine demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--teacher", help="teacher checkpoint folder (default: the shipped one)")
    parser.add_argument("--train-teacher", action="store_true", help="train the teacher here first")
    parser.add_argument("--rounds", type=int, default=1, help="teacher-student rounds in a row")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="the loopback crawl server's port (part of every URL and uid; a taken port falls back to a free "
        "one, with a warning)",
    )
    add_set_argument(parser, ["round", "train"])
    return parser


def _teacher(args, world: Path, out: Path) -> Path:
    if args.teacher:
        return Path(args.teacher)
    if not args.train_teacher and (teacher_job.ASSET / "config.json").is_file():
        return teacher_job.ASSET
    logger.info(
        "training the teacher on the world's human-annotated set (make teacher reproduces the shipped one)"
    )
    return teacher_job.train_teacher(world, out / "teacher")


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


def _round_summary(document: dict) -> dict:
    """The flat figures of one round: ``<model>_<metric>`` for teacher, baseline and student, the pseudo-labels'
    precision and recall (verified sample left out), the threshold and whether the student was promoted."""
    flat = {
        f"{model}_{key}": value
        for model, metrics in document["models"].items()
        for key, value in metrics.items()
    }
    pseudo = document["pseudo"]
    kept = {key: document[key] for key in ("pseudo_images", "threshold", "promoted", "reason")}
    return {**flat, "pseudo_precision": pseudo["precision"], "pseudo_recall": pseudo["recall"],
            "pseudo_boxes": pseudo["boxes"], **kept}  # fmt: skip


def _table(rounds: list[dict]) -> str:
    lines = [f"{'round':<7}{'model':<10}{'AP':>8}{'APr':>8}{'AP50':>8}{'R@1':>8}"]
    for number, summary in enumerate(rounds):
        for model in round_job.MODELS:
            cells = "".join(f"{summary[f'{model}_{key}']:>8.3f}" for key in ("ap", "apr", "ap50", "r1"))
            lines.append(f"{number:<7}{model:<10}{cells}")
        lines.append(
            f"{'':7}threshold {summary['threshold']:.2f}, promoted: {summary['promoted']} ({summary['reason']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = _parser()
    args, world_argv = parser.parse_known_args(argv)
    configs = apply_sets_or_exit(
        parser, args.sets, {"round": round_job.RoundConfig(), "train": round_job.DEFAULT_TRAIN}
    )
    out = Path(args.out).resolve()  # paths reach Ray workers, whose cwd is not this one
    began = time.perf_counter()
    world = out / "world"
    shutil.rmtree(
        out / "root", ignore_errors=True
    )  # the demo shows one whole run; real roots are incremental
    layout = Layout(str(out / "root"))
    with ImageServer(out, args.port, fallback=True) as server:
        options = world_job.build_parser().parse_args(
            [*world_argv, "--out", str(world), "--base-url", server.base_url]
        )
        manifest = world_job.generate_world(world_job.WorldOptions(**vars(options)))
        server.point_at(world / manifest["files"]["crawl_images"])
        teacher = _teacher(args, world, out)
        ingest = _ingest(world, layout, server.base_url)
        port = server.port
    rounds = []
    for number in range(args.rounds):
        first_teacher = teacher if number == 0 else None
        try:
            document = round_job.run_round(
                layout, world, number, first_teacher, configs["round"], configs["train"]
            )
        except round_job.NothingNew as stop:
            print(f"stopping before round {number}: {stop}")
            break
        rounds.append(_round_summary(document))
    summary = {**rounds[-1], "world": manifest["counts"], "ingest": ingest, "rounds": rounds,
               "report": layout.round(len(rounds) - 1, "report.html"), "port": port,
               "seconds": round(time.perf_counter() - began, 1)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    print(_table(rounds))
    print(f"report: {summary['report']}")
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict | list)}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
