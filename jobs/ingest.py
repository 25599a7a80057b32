"""Ingest web-crawl partitions (url, caption) into image shards with img2dataset: only partitions without a
ledger entry, only URLs no earlier partition claimed, resumable after a crash.

    python -m jobs.ingest --crawl demo-out/world/crawl --root demo-out/engine --allow-hosts 127.0.0.1:8765
    python -m jobs.ingest --crawl s3://bucket/crawl --root s3://bucket/engine --retry-failed \\
        --eval-set s3://bucket/coco/annotations/instances_val2017.json
    RAY_AUTH_MODE=token ray job submit --address http://head:8265 --working-dir . -- \\
        python -m jobs.ingest --crawl s3://bucket/crawl --root s3://bucket/engine --distributor ray

Output: ``<root>/images/<partition>/`` (img2dataset webdataset layout), ``<root>/ingest/`` (seen-sets,
failures) and ``<root>/ledger/ingest/<partition>.json``. Prints a summary table; exits 1 when a partition did
not finish (run again to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.graph import init_ray
from pipeline.ingest import DISTRIBUTORS, RESIZE_MODES, IngestConfig, run_ingest


def build_parser() -> argparse.ArgumentParser:
    defaults = IngestConfig()
    parser = argparse.ArgumentParser(prog="jobs.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--crawl", required=True, help="fsspec URL of the folder of crawl partitions")
    parser.add_argument("--root", required=True, help="fsspec URL of the output root")
    parser.add_argument("--retry-failed", action="store_true", help="retry earlier failures first")
    parser.add_argument(
        "--allow-hosts",
        action="append",
        default=[],
        help="host, host:port or CIDR whose non-public addresses may be fetched (repeat or comma-separate)",
    )
    parser.add_argument("--eval-set", action="append", default=[], help="image folder, COCO json or shards")
    parser.add_argument("--phash-threshold", type=int, default=defaults.phash_threshold)
    parser.add_argument("--min-correlation", type=float, default=defaults.min_correlation)
    parser.add_argument("--processes", type=int, default=defaults.processes_count)
    parser.add_argument("--threads", type=int, default=defaults.thread_count)
    parser.add_argument("--distributor", choices=DISTRIBUTORS, default=defaults.distributor)
    parser.add_argument("--shard-size", type=int, default=defaults.number_sample_per_shard)
    parser.add_argument("--timeout", type=float, default=defaults.timeout)
    parser.add_argument("--retries", type=int, default=defaults.retries)
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, default=defaults.resize_mode)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--encode-format", choices=("jpg", "png", "webp"), default=defaults.encode_format)
    parser.add_argument("--encode-quality", type=int, default=defaults.encode_quality)
    parser.add_argument("--min-image-size", type=int, default=defaults.min_image_size)
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument("--url-col", default=defaults.url_col)
    parser.add_argument("--caption-col", default=defaults.caption_col)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    allow_hosts = tuple(entry for value in args.allow_hosts for entry in value.split(",") if entry.strip())
    return IngestConfig(
        url_col=args.url_col,
        caption_col=args.caption_col,
        number_sample_per_shard=args.shard_size,
        processes_count=args.processes,
        thread_count=args.threads,
        distributor=args.distributor,
        timeout=args.timeout,
        retries=args.retries,
        resize_mode=args.resize_mode,
        image_size=args.image_size,
        encode_format=args.encode_format,
        encode_quality=args.encode_quality,
        min_image_size=args.min_image_size,
        max_image_pixels=args.max_image_pixels,
        allow_hosts=allow_hosts,
        eval_sets=tuple(args.eval_set),
        phash_threshold=args.phash_threshold,
        min_correlation=args.min_correlation,
        retry_failed=args.retry_failed,
        show_progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    if config.distributor == "ray":
        # Joins the cluster under `ray job submit` (RAY_ADDRESS); otherwise starts Ray in-process.
        init_ray()
    report = run_ingest(args.crawl, args.root, config)
    print(report.table())
    if not report.units:
        print("nothing to ingest: every partition already has a ledger entry")
    return 0 if report.complete else 1


if __name__ == "__main__":
    sys.exit(main())
