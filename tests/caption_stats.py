"""A toy stage for the stage-table tests: caption statistics of each phrased shard, written as one JSON file
per shard. It is what a new stage is: this module plus one row (``ROW``) in the stage table."""

from __future__ import annotations

import pyarrow.compute as pc

from pipeline import storage
from pipeline.graph import Stage
from pipeline.layout import Layout
from pipeline.schema import UnitOutput

ROW = Stage("caption-stats", upstream="phrases", worker="tests.caption_stats:CaptionStats",
            summary=("captions", "words"))  # fmt: skip


class CaptionStats:
    """Counts captions, words and phrases of one shard's phrase table; ``min_words`` flags short captions."""

    def __init__(self, min_words: int | None = None) -> None:
        self.min_words = min_words or 1

    def __call__(self, layout: Layout, shard: str) -> UnitOutput:
        table = storage.read_parquet(layout.fs, layout.phrase_table(shard))
        words = [len((caption or "").split()) for caption in table.column("caption").to_pylist()]
        stats = {
            "captions": table.num_rows,
            "words": sum(words),
            "phrases": int(pc.sum(pc.list_value_length(table.column("phrases"))).as_py() or 0),
        }
        storage.write_json(layout.fs, layout.output("caption-stats", shard, ".json"), stats)
        short = [
            {"uid": uid, "reason": "short_caption", "detail": f"{count} words"}
            for uid, count in zip(table.column("uid").to_pylist(), words)
            if count < self.min_words
        ]
        return UnitOutput(stats, short)
