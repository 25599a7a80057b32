"""Phrase extraction: spaCy noun chunks of captions as character spans (see ``pipeline.phrases``).

See what the filters do to your own captions (one caption per line in, one JSON object per line out):

    printf 'Stock photo of a red car, free HD wallpaper\\n' | python -m jobs.phrases --stdin
    # {"caption": "Stock photo of a red car, free HD wallpaper", "error": null,
    #  "phrases": [{"text": "a red car", "start": 15, "end": 24}]}

Extract phrases for every ingested image shard that has none yet, one Ray actor task per shard (any fsspec
root; re-runs skip done shards; a ``memory://`` root runs in this process):

    python -m jobs.phrases --root demo-out/root
    python -m jobs.phrases --root s3://bucket/engine --set phrases.expand_referring_expressions=true --workers 8
    RAY_AUTH_MODE=token ray job submit --address http://head:8265 --working-dir . -- \\
        /opt/glip-engine/.venv/bin/python -m jobs.phrases --root s3://bucket/engine --workers 8

Prints a table of the shards it extracted; exits 1 when a shard failed after its retries (a re-run retries it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

from jobs._roots import add_root_arguments, layout_from_args
from jobs._settings import add_set_argument, apply_sets_or_exit
from pipeline import graph
from pipeline.phrases import PhraseConfig, PhraseExtractor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip-engine phrases", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_root_arguments(parser, required=False)
    parser.add_argument("--stdin", action="store_true", help="captions on stdin, JSON lines on stdout")
    add_set_argument(parser, ["phrases"])
    parser.add_argument("--workers", type=int, default=1, help="spaCy actors")
    parser.add_argument("--max-attempts", type=int, default=3, help="tries per shard before it is failed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _batches(lines: TextIO, size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        batch.append(line.rstrip("\r\n"))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stream(extractor: PhraseExtractor, lines: TextIO, out: TextIO) -> None:
    for captions in _batches(lines, extractor.config.batch_size):
        for caption, result in zip(captions, extractor.analyze(captions)):
            phrases = [p._asdict() for p in result.phrases]
            record = {"caption": caption, "error": result.error, "phrases": phrases}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.stdin == bool(args.root):
        parser.error("give exactly one of --stdin and --root")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = apply_sets_or_exit(parser, args.sets, {"phrases": PhraseConfig()})["phrases"]
    if args.stdin:
        _stream(PhraseExtractor(config), sys.stdin, sys.stdout)
        return 0
    layout = layout_from_args(parser, args)
    result = graph.run(layout, "phrases", config, workers=args.workers, max_attempts=args.max_attempts,
                       progress=not args.quiet)  # fmt: skip
    print(result.table(), flush=True)
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
