"""One Layout names every path: ingest -> phrases -> label under renamed folders leave nothing under the default
names; the three stages' error tables share one schema; layouts travel to workers and refuse unsafe names."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import graph, storage, tars
from pipeline.label import LabelConfig, LabelSettings, label_stage
from pipeline.layout import Folders, Layout
from pipeline.ledger import Ledger
from pipeline.phrases import PhraseConfig
from pipeline.schema import ERROR_SCHEMA, validate
from teacher.teacher import TeacherConfig
from tests._crawl import served_crawl, tiny_teacher

pytestmark = [pytest.mark.smoke, pytest.mark.timeout(600)]

RENAMED = Folders(
    images="img", ingest="in", phrases="phr", labels="lab", errors="err", ledger="done", rounds="rnd"
)


def _add_crawl_rows(crawl: Path, rows: list[dict]) -> None:
    """A second crawl partition (images the server already serves, under new URLs, hence new uids)."""
    pa.parquet.write_table(pa.Table.from_pylist(rows), crawl / "part-00001.parquet")


def test_every_stage_writes_under_the_layout_and_errors_share_one_schema(tmp_path: Path) -> None:
    import pyarrow.parquet  # noqa: F401 - pa.parquet below

    layout = Layout(str(tmp_path / "root"), RENAMED)
    with served_crawl(tmp_path, crawl_images=6, dead_urls=1) as crawl:
        first = pa.parquet.read_table(Path(crawl.crawl) / "part-00000.parquet").to_pylist()[0]
        _add_crawl_rows(
            Path(crawl.crawl), [{"url": first["url"] + "?copy=1", "caption": "\U0001f600\U0001f600"}]
        )
        ingest = graph.run(layout, "ingest", crawl.ingest_config(number_sample_per_shard=4), progress=False)
    assert ingest.complete and list(ingest.results) == ["part-00000", "part-00001"]
    phrases = graph.run(layout, "phrases", PhraseConfig(), in_process=True, progress=False)
    assert phrases.complete and phrases.results
    # A tar member without an ingest row, as a hand-edited shard would have: the label stage quarantines it.
    shard = sorted(phrases.results)[0]
    tar = layout.image_shard(shard, ".tar")
    samples = [s for s in tars.iter_samples(layout.fs, tar)]
    stray = {"__key__": "stray", "jpg": next(s for s in samples if "jpg" in s)["jpg"]}
    tars.write_samples(layout.fs, tar, [*samples, stray])
    teacher = tiny_teacher(tmp_path / "teacher")
    settings = LabelSettings(TeacherConfig(checkpoint=str(teacher)), LabelConfig(floor_score=0.0))
    label = graph.run(layout, "label", settings, in_process=True, progress=False)
    assert label.complete and sorted(label.results) == sorted(phrases.results)

    root = tmp_path / "root"
    assert sorted(p.name for p in root.iterdir()) == ["done", "err", "img", "in", "lab", "phr"]
    # Below those, stage names name the ledger and error folders (done/ingest, err/phrases): not folder names.
    assert not [p for p in root.rglob("*") if p.name in ("images", "labels", "errors", "ledger", "rounds")]

    reasons = {}
    for stage, unit in (
        ("ingest", "part-00000"),
        ("phrases", "part-00001/00000"),
        (label_stage(settings.folder), shard),
    ):
        table = storage.read_parquet(layout.fs, layout.errors(stage, unit))
        validate(table, ERROR_SCHEMA)  # one schema, its name and version in the file
        assert set(table.column("stage").to_pylist()) == {stage}
        reasons[stage] = table.column("reason").to_pylist()
    assert reasons["ingest"] == ["failed_to_download"]  # the dead URL, with what a retry needs
    ingest_error = storage.read_parquet(layout.fs, layout.errors("ingest", "part-00000")).to_pylist()[0]
    assert ingest_error["url"].startswith("http://127.0.0.1") and ingest_error["caption"]
    assert reasons["phrases"] == ["empty_caption"]  # the emoji-only caption
    assert reasons[label_stage(settings.folder)] == ["unknown_tar_member"]
    assert Ledger(layout, "ingest").units() == ["part-00000", "part-00001"]


def test_layouts_pickle_with_their_folders_and_options(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path), RENAMED, anon=True)
    copy = pickle.loads(pickle.dumps(layout))
    assert (copy.url, copy.folders, copy.storage_options) == (layout.url, RENAMED, {"anon": True})
    assert copy.phrase_table("p/00000") == f"{tmp_path}/phr/p/00000.parquet"
    assert Layout("memory://x").in_driver_memory and not layout.in_driver_memory


def test_layout_paths_and_unsafe_names(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    assert layout.image_shard("day1/00003", ".tar") == f"{tmp_path}/images/day1/00003.tar"
    assert layout.label_shard("t-1", "day1/00003", ".parquet") == f"{tmp_path}/labels/t-1/day1/00003.parquet"
    assert layout.errors("label-t-1", "day1/00003") == f"{tmp_path}/errors/label-t-1/day1/00003.parquet"
    assert layout.ledger_entry("phrases", "day1/00003") == f"{tmp_path}/ledger/phrases/day1/00003.json"
    assert (
        layout.output("caption-stats", "day1/00003", ".json") == f"{tmp_path}/caption-stats/day1/00003.json"
    )
    assert layout.round(2, "metrics.json") == f"{tmp_path}/rounds/r2/metrics.json"
    for unit in ("../x", "/abs", "a/../../b", ""):
        with pytest.raises(ValueError, match="invalid unit name"):
            layout.phrase_table(unit)
    for bad in ("a/b", "..", ".hidden"):
        with pytest.raises(ValueError, match="one path segment"):
            layout.label_folder(bad)
    with pytest.raises(ValueError, match="must differ"):
        Folders(images="x", phrases="x")
