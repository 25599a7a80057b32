"""Pseudo-label every ingested image shard: phrases (where still pending), then the teacher, on Ray.

Locally (an in-process Ray with this machine's cores; a ``memory://`` root runs without Ray):

    python -m jobs.label --root demo-out/engine --teacher demo-out/teacher --threshold 0.5 \\
        --truth demo-out/world/crawl_truth.json

On a cluster (Ray 2.60 clusters use token authentication: the client needs ``RAY_AUTH_MODE=token`` and the
cluster's token in ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``, e.g. from ``ray get-auth-token`` on the
head; the job's driver joins the cluster through the ``RAY_ADDRESS`` that ``ray job submit`` sets):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.label --root s3://bucket/engine --teacher /models/glip_tiny_model_o365_goldg.pth \\
        --official-config glip_t --workers 8 --gpus-per-worker 1

The teacher checkpoint (and the ``--truth`` file) must be readable where the job runs; the root must be
shared storage that every node sees (s3://, a network mount). S3-compatible endpoints: set
``AWS_ENDPOINT_URL`` (and the usual ``AWS_*`` keys) or pass ``--storage-option endpoint_url=...``.

Re-running does only the shards without a ledger entry, so a killed job is resumed by running it again.
Exit status 1 when some shard failed after its retries (the others are done; a re-run retries it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import fsspec

from pipeline.exports import read_labels
from pipeline.graph import StageRun, init_ray, is_driver_memory, run_label_stage, run_phrase_stage
from pipeline.label import NMS_MODES, LabelConfig
from pipeline.phrases import PhraseConfig
from pipeline.quality import quality
from teacher.teacher import TeacherConfig

logger = logging.getLogger("jobs.label")

# Per stage, the ledger stats shown in the summary table.
SUMMARY_COLUMNS = {
    "phrases": ("rows", "phrases"),
    "label": ("images", "boxes", "errors", "seconds"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.label", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="output root (local path or fsspec URL)")
    parser.add_argument("--teacher", required=True, help="checkpoint folder, or an official .pth")
    parser.add_argument("--official-config", help="for an official .pth: preset name or config JSON path")
    parser.add_argument("--teacher-name", help="name in teacher_id (default: the checkpoint's name)")
    parser.add_argument("--device", help="teacher device (default: CUDA when the worker has a GPU)")
    parser.add_argument(
        "--teacher-set", dest="teacher_overrides", action="append", default=[], metavar="KEY=VALUE",
        help="inference-only model override, e.g. input.min_size=480 (postprocess.*, input.*)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="actors per stage")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per label actor")
    parser.add_argument("--threshold", type=float, default=LabelConfig.score_threshold)
    parser.add_argument("--nms", choices=NMS_MODES, default=LabelConfig.nms)
    parser.add_argument("--round", type=int, default=0, help="self-training round recorded in the rows")
    parser.add_argument("--label-only-tars", action="store_true", help="tars without image bytes")
    parser.add_argument("--max-attempts", type=int, default=3, help="tries per shard before it is failed")
    parser.add_argument("--truth", help="crawl_truth.json: print pseudo-label precision and recall")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    parser.add_argument(
        "--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE",
        help="fsspec option for the root, e.g. endpoint_url=http://127.0.0.1:9000",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _key_values(items: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"{item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


def summary_table(run: StageRun) -> str:
    """One line per unit the run tried: status, tries and the stage's main stats; then the failures."""
    columns = SUMMARY_COLUMNS["label" if run.teacher else "phrases"]
    lines = [f"{run.stage}: {len(run.results)} unit(s), {len(run.failed)} failed"]
    lines.append(f"  {'unit':<24}{'status':>8}{'tries':>6}" + "".join(f"{c:>10}" for c in columns))
    for unit, result in run.results.items():
        stats = result.stats or {}
        cells = "".join(f"{_cell(stats.get(c)):>10}" for c in columns)
        lines.append(f"  {unit:<24}{result.status:>8}{result.attempts:>6}{cells}")
    lines += [f"  failed {unit}: {run.results[unit].error}" for unit in run.failed]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def quality_lines(root: str, teacher: str, truth_url: str, storage_options: dict[str, Any]) -> str:
    """Precision and recall of every finished label shard of ``teacher`` against the crawl truth."""
    with fsspec.open(truth_url, "rb") as handle:
        truth = json.load(handle)
    report = quality(read_labels(root, teacher, **storage_options), truth)
    rates = {k: (None if v is None else round(v, 4)) for k, v in report.to_dict().items()}
    return "quality: " + json.dumps(rates, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    storage_options = _key_values(args.storage_options, parser)
    try:
        label_config = LabelConfig(score_threshold=args.threshold, nms=args.nms, round=args.round,
                                   label_only_tars=args.label_only_tars)  # fmt: skip
        teacher_config = TeacherConfig(checkpoint=args.teacher, official_config=args.official_config,
                                       name=args.teacher_name, device=args.device,
                                       overrides=tuple(args.teacher_overrides))  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    if not is_driver_memory(args.root):
        init_ray(args.address)
    run_options = {"max_attempts": args.max_attempts, "progress": not args.quiet,
                   "storage_options": storage_options}  # fmt: skip
    phrases = run_phrase_stage(args.root, PhraseConfig(), args.workers, **run_options)
    print(summary_table(phrases), flush=True)
    labels = run_label_stage(args.root, label_config, teacher_config, args.workers, args.gpus_per_worker,
                             **run_options)  # fmt: skip
    print(summary_table(labels), flush=True)
    if args.truth:
        print(quality_lines(args.root, labels.teacher, args.truth, storage_options), flush=True)
    return 1 if phrases.failed or labels.failed else 0


if __name__ == "__main__":
    sys.exit(main())
