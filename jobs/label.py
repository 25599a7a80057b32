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

The root must be shared storage that every node sees (s3://, a network mount). The teacher is a local path
that every node has, or an fsspec URL (``--teacher s3://bucket/models/glip_t``) that the driver and each node
copy into their cache once (``teacher.fetch``; ``--set teacher.cache=/nvme/cache`` chooses where); a URL and
the ``--truth`` file are read with ``--teacher-storage-option`` values, else with the root's
``--storage-option`` values when they are on the root's protocol. S3-compatible endpoints: set
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

from jobs._roots import add_root_arguments, layout_from_args, options_for, parse_options
from jobs._settings import add_set_argument, apply_sets_or_exit
from pipeline import graph
from pipeline.executor import init_ray
from pipeline.exports import iter_labels
from pipeline.label import LabelConfig, LabelSettings
from pipeline.layout import Layout
from pipeline.phrases import PhraseConfig
from pipeline.quality import quality
from teacher.fetch import is_remote
from teacher.teacher import TeacherConfig

logger = logging.getLogger("jobs.label")

_TEACHER_FIELDS = {field.name for field in dataclasses.fields(TeacherConfig)} - {
    "checkpoint",
    "overrides",
    "storage_options",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip-engine label", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_root_arguments(parser)
    parser.add_argument(
        "--teacher",
        required=True,
        help="checkpoint folder, or an official .pth: a local path or an fsspec URL",
    )
    parser.add_argument(
        "--teacher-storage-option", dest="teacher_options", action="append", default=[], metavar="KEY=VALUE",
        help="fsspec option for a --teacher URL and --truth (repeatable; default: the root's on its protocol)",
    )  # fmt: skip
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
    parser: argparse.ArgumentParser, args: argparse.Namespace, layout: Layout
) -> tuple[PhraseConfig, LabelSettings]:
    """The phrase and label configs of the command line. ``--set teacher.KEY`` sets a ``TeacherConfig``
    field; any other ``teacher.`` key is an inference-only model override (``TeacherConfig.overrides``)."""
    storage_options = _teacher_options(parser, args, layout)
    if not _exists(args.teacher, storage_options):
        parser.error(f"--teacher {args.teacher}: no such checkpoint file or folder")
    sets = list(args.sets)
    model_overrides = [item.removeprefix("teacher.") for item in sets if _is_model_override(item)]
    sets = [item for item in sets if not _is_model_override(item)]
    try:
        teacher = TeacherConfig(checkpoint=args.teacher, official_config=args.official_config,
                                overrides=tuple(model_overrides), storage_options=storage_options)  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    configs = apply_sets_or_exit(
        parser, sets, {"phrases": PhraseConfig(), "label": LabelConfig(), "teacher": teacher}
    )
    return configs["phrases"], LabelSettings(configs["teacher"], configs["label"])


def _teacher_options(parser: argparse.ArgumentParser, args: argparse.Namespace, layout: Layout) -> dict:
    return options_for(
        args.teacher, layout, parse_options(parser, args.teacher_options, "--teacher-storage-option")
    )


def _exists(url: str, storage_options: dict[str, Any]) -> bool:
    if not is_remote(url):
        return Path(url).exists()
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs.exists(path)


def _is_model_override(item: str) -> bool:
    section, _, key = item.partition(".")
    return section == "teacher" and key.partition("=")[0].split(".")[0].strip() not in _TEACHER_FIELDS


def quality_lines(
    layout: Layout,
    teacher: str,
    truth_url: str,
    threshold: float,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Precision and recall of every finished label shard of ``teacher``, boxes above ``threshold``, against
    the crawl truth (``truth_url`` read with ``storage_options``)."""
    with fsspec.open(truth_url, "rb", **(storage_options or {})) as handle:
        truth = json.load(handle)
    report = quality((table for _, table in iter_labels(layout, teacher, threshold)), truth)
    rates = {k: (None if v is None else round(v, 4)) for k, v in report.to_dict().items()}
    return "quality: " + json.dumps(rates, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    layout = layout_from_args(parser, args)
    phrase_config, settings = configs_from_args(parser, args, layout)
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
        given = parse_options(parser, args.teacher_options, "--teacher-storage-option")
        truth_options = options_for(args.truth, layout, given)
        print(quality_lines(layout, settings.folder, args.truth, args.threshold, truth_options), flush=True)
    return 1 if phrases.failed or labels.failed else 0


if __name__ == "__main__":
    sys.exit(main())
