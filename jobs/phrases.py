"""Phrase extraction: spaCy noun chunks of captions as character spans (see ``pipeline.phrases``).

See what the filters do to your own captions (one caption per line in, one JSON object per line out):

    printf 'Stock photo of a red car, free HD wallpaper\\n' | python -m jobs.phrases --stdin
    # {"caption": "Stock photo of a red car, free HD wallpaper", "error": null,
    #  "phrases": [{"text": "a red car", "start": 15, "end": 24}]}

Extract phrases for every ingested image shard that has none yet (any fsspec root; re-runs skip done shards):

    python -m jobs.phrases --root demo-out
    python -m jobs.phrases --root s3://bucket/engine --set expand_referring_expressions=True
    ray job submit --address http://head:8265 --working-dir . -- python -m jobs.phrases --root s3://bucket/engine
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from typing import TextIO

from pipeline.phrases import PhraseConfig, PhraseExtractor, run_phrases


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.phrases", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--stdin", action="store_true", help="captions on stdin, JSON lines on stdout")
    source.add_argument("--root", help="output root (local path or fsspec URL) holding images/ and ledger/")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a PhraseConfig field, e.g. --set max_phrases_per_caption=8",
    )  # fmt: skip
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = PhraseConfig().with_overrides(args.overrides)
    except (KeyError, ValueError, TypeError) as error:
        parser.error(str(error))
    if args.stdin:
        _stream(PhraseExtractor(config), sys.stdin, sys.stdout)
        return 0
    done = run_phrases(args.root, config)
    logging.getLogger("jobs.phrases").info("phrases: %d shard(s) done under %s", len(done), args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
