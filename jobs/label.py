"""Pseudo-label every ingested image shard: phrases (where still pending), then the teacher, on Ray.

Locally (an in-process Ray with this machine's cores; a ``memory://`` root runs without Ray):

    python -m jobs.label --root demo-out/engine --teacher demo-out/teacher \\
        --truth demo-out/world/crawl_truth.json --threshold 0.5
    python -m jobs.label --root demo-out/engine --teacher demo-out/teacher --set label.nms=global \\
        --set teacher.input.min_size=480 --set phrases.max_phrases_per_caption=8

On a cluster (Ray 2.60 clusters use token authentication: the client needs ``RAY_AUTH_MODE=token`` and the
cluster's token in ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``, e.g. from ``ray get-auth-token`` on the
head; the job's driver joins the cluster through the ``RAY_ADDRESS`` that ``ray job submit`` sets; the entrypoint
names the interpreter of the environment every node has, README "On a Ray cluster"):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        /opt/glip-engine/.venv/bin/python -m jobs.label --root s3://bucket/engine \\
        --teacher /models/glip_tiny_model_o365_goldg.pth --official-config glip_t --workers 8 --gpus-per-worker 1

The teacher checkpoint (and the ``--truth`` file) must be readable where the job runs; the root must be
shared storage that every node sees (s3://, a network mount). S3-compatible endpoints: set
``AWS_ENDPOINT_URL`` (and the usual ``AWS_*`` keys) or pass ``--storage-option endpoint_url=...``.

``--set`` sections: ``phrases.`` (``PhraseConfig``), ``label.`` (``LabelConfig``), ``teacher.``
(``TeacherConfig`` fields such as ``teacher.batch_size`` or ``teacher.device``, and inference-only model keys
such as ``teacher.input.min_size`` or ``teacher.postprocess.score_threshold``).

Labels are written at a floor score (``--set label.floor_score=0.3``, the default) and reused by every
threshold: ``--threshold`` is the keep-threshold at which the ``--truth`` quality line reads them (and at which
``glip-engine export`` would export them).

Re-running does only the shards without a ledger entry, so a killed job is resumed by running it again.
Exit status 1 when some shard failed after its retries (the others are done; a re-run retries it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import fsspec

from jobs._roots import add_root_arguments, layout_from_args
from jobs._settings import add_set_argument, apply_sets_or_exit
from pipeline import graph
from pipeline.executor import init_ray
from pipeline.exports import iter_labels
from pipeline.label import LabelConfig, LabelSettings
from pipeline.layout import Layout
from pipeline.phrases import PhraseConfig
from pipeline.quality import quality
from teacher.teacher import TeacherConfig

logger = logging.getLogger("jobs.label")

_TEACHER_FIELDS = {field.name for field in dataclasses.fields(TeacherConfig)} - {"checkpoint", "overrides"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip-engine label", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_root_arguments(parser)
    parser.add_argument("--teacher", required=True, help="checkpoint folder, or an official .pth")
    parser.add_argument("--official-config", help="for an official .pth: preset name or config JSON path")
    add_set_argument(parser, ["phrases", "label", "teacher"])
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="keep-threshold of the --truth quality line"
    )
    parser.add_argument("--workers", type=int, default=1, help="actors per stage")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per label actor")
    parser.add_argument("--max-attempts", type=int, default=3, help="tries per shard before it is failed")
    parser.add_argument("--truth", help="crawl_truth.json: print pseudo-label precision and recall")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def configs_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[PhraseConfig, LabelSettings]:
    """The phrase and label configs of the command line. ``--set teacher.KEY`` sets a ``TeacherConfig``
    field; any other ``teacher.`` key is an inference-only model override (``TeacherConfig.overrides``)."""
    if not Path(args.teacher).exists():
        parser.error(f"--teacher {args.teacher}: no such checkpoint file or folder")
    sets = list(args.sets)
    model_overrides = [item.removeprefix("teacher.") for item in sets if _is_model_override(item)]
    sets = [item for item in sets if not _is_model_override(item)]
    try:
        teacher = TeacherConfig(checkpoint=args.teacher, official_config=args.official_config,
                                overrides=tuple(model_overrides))  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    configs = apply_sets_or_exit(
        parser, sets, {"phrases": PhraseConfig(), "label": LabelConfig(), "teacher": teacher}
    )
    return configs["phrases"], LabelSettings(configs["teacher"], configs["label"])


def _is_model_override(item: str) -> bool:
    section, _, key = item.partition(".")
    return section == "teacher" and key.partition("=")[0].split(".")[0].strip() not in _TEACHER_FIELDS


def quality_lines(layout: Layout, teacher: str, truth_url: str, threshold: float) -> str:
    """Precision and recall of every finished label shard of ``teacher``, boxes above ``threshold``, against
    the crawl truth."""
    with fsspec.open(truth_url, "rb") as handle:
        truth = json.load(handle)
    report = quality((table for _, table in iter_labels(layout, teacher, threshold)), truth)
    rates = {k: (None if v is None else round(v, 4)) for k, v in report.to_dict().items()}
    return "quality: " + json.dumps(rates, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    layout = layout_from_args(parser, args)
    phrase_config, settings = configs_from_args(parser, args)
    if not layout.in_driver_memory:
        init_ray(args.address)
    options: dict[str, Any] = {
        "workers": args.workers,
        "max_attempts": args.max_attempts,
        "progress": not args.quiet,
    }
    phrases = graph.run(layout, "phrases", phrase_config, **options)
    print(phrases.table(), flush=True)
    labels = graph.run(layout, "label", settings, gpus_per_worker=args.gpus_per_worker, **options)
    print(labels.table(), flush=True)
    if args.truth:
        print(quality_lines(layout, settings.folder, args.truth, args.threshold), flush=True)
    return 1 if phrases.failed or labels.failed else 0


if __name__ == "__main__":
    sys.exit(main())
