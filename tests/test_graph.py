"""The stage table: a new stage is one module and one row; one pending rule; one run, in process and on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import graph, storage
from pipeline.graph import STAGES, Stage, StageTable
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.phrases import PhraseConfig
from pipeline.schema import ERROR_SCHEMA, url_uid, validate
from tests import caption_stats
from tests._ray_cluster import local_ray  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(300)

CAPTIONS = {
    "day1/00000": ["A red circle next to two blue squares", "stock photo"],
    "day1/00001": ["a green triangle on a wooden table, free HD wallpaper"],
    "day2/00000": ["Two yellow stars", ""],
}


def _ingested_root(root: Path) -> Layout:
    """Image-shard parquets and ingest ledger entries as the ingest stage leaves them (no tars: the phrase
    stage reads the parquets only)."""
    layout = Layout(str(root))
    for shard, captions in CAPTIONS.items():
        urls = [f"http://example.com/{shard}/{i}.jpg" for i in range(len(captions))]
        rows = {"uid": [url_uid(u) for u in urls], "caption": captions, "status": ["success"] * len(captions)}
        storage.write_parquet(layout.fs, layout.image_shard(shard, ".parquet"), pa.table(rows))
    for partition in ("day1", "day2"):
        shards = [shard for shard in CAPTIONS if shard.startswith(partition + "/")]
        Ledger(layout, "ingest").record(partition, {"shards": shards})
    return layout


def test_pending_derives_units_from_what_upstream_finished(tmp_path: Path) -> None:
    layout = _ingested_root(tmp_path)
    assert graph.pending(layout, "phrases") == list(CAPTIONS)  # fan-out: partition -> its shards
    Ledger(layout, "ingest").record("day3", {"shards": []})  # a partition whose every URL failed
    assert graph.pending(layout, "phrases") == list(CAPTIONS)
    table = STAGES.with_stage(caption_stats.ROW)
    assert graph.pending(layout, "caption-stats", table=table) == []  # nothing phrased yet
    Ledger(layout, "phrases").record("day1/00001", {})
    assert graph.pending(layout, "phrases") == ["day1/00000", "day2/00000"]
    assert graph.pending(layout, "caption-stats", table=table) == ["day1/00001"]  # one per finished unit


def test_a_new_stage_is_one_module_and_one_row_in_process(tmp_path: Path) -> None:
    layout = _ingested_root(tmp_path)
    table = STAGES.with_stage(caption_stats.ROW)
    phrases = graph.run(layout, "phrases", PhraseConfig(), in_process=True, progress=False)
    assert phrases.complete and list(phrases.results) == list(CAPTIONS)
    run = graph.run(layout, "caption-stats", 2, table=table, in_process=True, progress=False)
    assert run.stage == "caption-stats" and run.complete and list(run.results) == list(CAPTIONS)
    for shard, captions in CAPTIONS.items():
        written = json.loads(Path(layout.output("caption-stats", shard, ".json")).read_text())
        assert written["captions"] == len(captions)
        assert written["words"] == sum(len(c.split()) for c in captions)
        assert run.results[shard].stats["words"] == written["words"]
    errors = storage.read_parquet(layout.fs, layout.errors("caption-stats", "day2/00000"))
    validate(errors, ERROR_SCHEMA)
    assert errors.column("reason").to_pylist() == ["short_caption"]  # the empty caption (min_words=2)
    assert "caption-stats" in run.table() and "words" in run.table().splitlines()[1]
    again = graph.run(layout, "caption-stats", 2, table=table, in_process=True, progress=False)
    assert again.results == {} and again.complete


@pytest.mark.usefixtures("local_ray")
def test_the_new_stage_runs_on_ray_and_a_rerun_does_nothing(tmp_path: Path) -> None:
    layout = _ingested_root(tmp_path)
    table = STAGES.with_stage(caption_stats.ROW)
    assert graph.run(layout, "phrases", PhraseConfig(), workers=2, progress=False).complete
    run = graph.run(layout, "caption-stats", None, table=table, workers=2, progress=False)
    assert run.complete and sorted(run.results) == sorted(CAPTIONS)
    assert Ledger(layout, "caption-stats").units() == sorted(CAPTIONS)
    assert graph.run(layout, "caption-stats", None, table=table, workers=2, progress=False).results == {}
    assert graph.run(layout, "phrases", PhraseConfig(), workers=2, progress=False).results == {}


def test_the_table_checks_its_rows() -> None:
    with pytest.raises(ValueError, match="not a stage"):
        StageTable(Stage("orphan", upstream="nowhere", worker="tests.caption_stats:CaptionStats"))
    with pytest.raises(KeyError, match="stages: \\['ingest', 'phrases', 'label'\\]"):
        STAGES["nope"]
    assert [STAGES[name].upstream for name in STAGES] == [None, "ingest", "phrases"]
