"""Ingest web-crawl partitions (url, caption) into image shards with img2dataset: only partitions without a
ledger entry, only URLs no earlier partition claimed, resumable after a crash.

    python -m jobs.ingest --crawl demo-out/world/crawl --root demo-out/engine --allow-hosts 127.0.0.1:8765
    python -m jobs.ingest --crawl s3://bucket/crawl --root s3://bucket/engine --retry-failed \\
        --eval-set s3://bucket/coco/annotations/instances_val2017.json --set ingest.number_sample_per_shard=5000
    RAY_AUTH_MODE=token ray job submit --address http://head:8265 --working-dir . -- \\
        /opt/glip-engine/.venv/bin/python -m jobs.ingest --crawl s3://bucket/crawl --root s3://bucket/engine \\
        --set ingest.distributor=ray

Every ``IngestConfig`` field is ``--set ingest.KEY=VALUE`` (``processes_count``, ``thread_count``, ``timeout``,
``retries``, ``resize_mode``, ``max_image_pixels`` ...); ``--allow-hosts``, ``--eval-set`` and
``--retry-failed`` are shortcuts for ``ingest.allow_hosts``, ``ingest.eval_sets`` and ``ingest.retry_failed``.

Output: the image shards, the ingest plans and seen-sets, one error table and one ledger entry per partition
(``pipeline.layout``). Prints a summary table; exits 1 when a partition did not finish (run again to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs._roots import add_root_arguments, layout_from_args
from jobs._settings import add_set_argument, apply_sets_or_exit
from pipeline import graph
from pipeline.executor import init_ray
from pipeline.ingest import IngestConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip-engine ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--crawl", required=True, help="fsspec URL of the folder of crawl partitions")
    add_root_arguments(parser)
    add_set_argument(parser, ["ingest"])
    parser.add_argument(
        "--allow-hosts", action="append", default=[],
        help="host, host:port or CIDR whose non-public addresses may be fetched (repeat or comma-separate)",
    )  # fmt: skip
    parser.add_argument("--eval-set", action="append", default=[], help="image folder, COCO json or shards")
    parser.add_argument("--retry-failed", action="store_true", help="retry earlier failures first")
    parser.add_argument("--max-attempts", type=int, default=3, help="tries per partition in this run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> IngestConfig:
    """The ``IngestConfig`` of the command line: the shortcuts first, then every ``--set ingest.KEY``."""
    allow_hosts = tuple(entry for value in args.allow_hosts for entry in value.split(",") if entry.strip())
    try:
        base = IngestConfig(crawl=args.crawl, allow_hosts=allow_hosts, eval_sets=tuple(args.eval_set),
                            retry_failed=args.retry_failed)  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    return apply_sets_or_exit(parser, args.sets, {"ingest": base})["ingest"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    layout = layout_from_args(parser, args)
    config = config_from_args(parser, args)
    if config.distributor == "ray":
        init_ray()  # joins the cluster under `ray job submit` (RAY_ADDRESS); otherwise starts Ray in-process
    result = graph.run(layout, "ingest", config, max_attempts=args.max_attempts, progress=not args.quiet)
    print(result.table())
    if not result.results:
        print("nothing to ingest: every partition already has a ledger entry")
    return 0 if result.complete else 1


if __name__ == "__main__":
    sys.exit(main())
