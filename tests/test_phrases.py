"""The phrase stage: filters on messy web captions, record batches, shards on fsspec roots, the job."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import ray

from glip.config import replace_dotted
from pipeline import graph, storage
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.phrases import (
    PhraseConfig,
    PhraseExtractor,
    clean_caption,
    extract_shard,
    phrases_for_table,
)
from pipeline.schema import ERROR_SCHEMA, PHRASE_TABLE_SCHEMA, PHRASES_TYPE, UnitOutput, url_uid, validate

REPO = Path(__file__).resolve().parents[1]
MESSY = [json.loads(line) for line in (REPO / "tests/data/messy_captions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def extractor() -> PhraseExtractor:
    return PhraseExtractor(PhraseConfig())


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", text.lower()) is not None


# ------------------------------------------------------------------------------------------ caption level


def test_messy_captions_keep_objects_and_drop_the_rest(extractor: PhraseExtractor) -> None:
    assert len(MESSY) >= 40
    results = extractor.analyze([row["caption"] for row in MESSY])
    for row, result in zip(MESSY, results):
        texts = [p.text for p in result.phrases]
        assert result.error == row["error"], row["caption"]
        for kept in row["keep"]:
            assert kept in texts, (row["caption"], texts)
        for word in row["absent"]:
            assert not any(_contains_word(t, word) for t in texts), (row["caption"], word, texts)


def test_spans_point_into_the_original_caption_in_order(extractor: PhraseExtractor) -> None:
    captions = [row["caption"] for row in MESSY]
    total = 0
    for caption, found in zip(captions, extractor(captions)):
        for phrase in found:
            assert caption[phrase.start : phrase.end] == phrase.text
            assert phrase.text == phrase.text.strip() and phrase.text
        starts = [p.start for p in found]
        assert starts == sorted(starts)
        assert len({p.text.casefold() for p in found}) == len(found)
        total += len(found)
    assert total >= 60


def test_generic_words_are_cut_out_not_kept(extractor: PhraseExtractor) -> None:
    [found] = extractor(["stock photo of a cat on a free wallpaper"])
    assert [p.text for p in found] == ["a cat"]
    [found] = extractor(["a free red car wallpaper"])
    assert [p.text for p in found] == ["red car"]


def test_cleaning_maps_offsets_back_through_entities_tags_and_gaps() -> None:
    caption = "<p>Salt &amp; pepper</p>  on   a <i>table</i> 🐶 #tag"
    cleaned = clean_caption(caption)
    assert "<" not in cleaned.text and "&" in cleaned.text
    assert "🐶" not in cleaned.text and "tag" not in cleaned.text
    for word in ("Salt", "pepper", "on", "a", "table"):
        start = cleaned.text.index(word)
        original = cleaned.to_original(start, start + len(word))
        assert caption[original[0] : original[1]] == word
    ampersand = cleaned.text.index("&")
    original = cleaned.to_original(ampersand, ampersand + 1)
    assert caption[original[0] : original[1]] == "&amp;"
    plain = "A dog on a sofa."
    assert clean_caption(plain) == (plain, None)


def test_cap_keeps_the_first_phrases_in_caption_order() -> None:
    capped = PhraseExtractor(PhraseConfig(max_phrases_per_caption=3, max_phrase_tokens=3))
    caption = "a man on a bike; a woman with a stroller; a dog; a big red circle; a bus"
    [found] = capped([caption])
    assert [p.text for p in found] == ["a man", "a bike", "a woman"]
    [found] = capped(["a big red circle and a dog"])
    assert [p.text for p in found] == ["a dog"]  # 4 tokens is over this config's max_phrase_tokens


def test_a_long_caption_is_cut_at_a_word_boundary_and_its_phrases_kept() -> None:
    capped = PhraseExtractor(
        PhraseConfig(max_caption_chars=60, max_caption_words=12, max_phrases_per_caption=3)
    )
    assert capped.max_chars == 60 <= capped.nlp.max_length
    by_chars = "A brown dog chases a red ball. " * 3  # 93 characters; the cap falls inside "chases"
    by_words = "a cat on a mat with a hat and a bat near a rat"  # 14 words, 46 characters
    html = "<p>" + "a small boat &amp; a tall lighthouse " * 4 + "</p>"
    results = capped.analyze([by_chars, by_words, html, "a fox in the snow", "word" * 5000])
    assert [r.truncated for r in results] == [True, True, True, False, True]
    texts = [[p.text for p in r.phrases] for r in results]
    # Cut after "chases a red ball. A brown dog" (the 60th character is inside the next word).
    assert texts[0] == ["A brown dog", "a red ball"]  # repeated texts kept once
    assert texts[1] == ["a cat", "a mat", "a hat"]  # capped at max_phrases_per_caption
    assert texts[2] == ["a small boat", "a tall lighthouse"] and texts[3] == ["a fox", "the snow"]
    assert results[4].phrases == [] and results[4].error == "empty_caption"  # no fragment of a word
    for caption, result in zip([by_chars, by_words, html], results):
        assert all(caption[p.start : p.end] == p.text for p in result.phrases), "offsets into the original"
        assert result.error is None
    # A caption far over the cap (10 MB) costs a window, not a parse of 10 MB, and still yields its phrases.
    [huge] = capped.analyze(["a white horse in a meadow " * 400_000])
    assert huge.truncated and [p.text for p in huge.phrases] == ["a white horse", "a meadow"]


def test_control_characters_are_gaps_and_sparse_french_is_not_english(extractor: PhraseExtractor) -> None:
    caption = "a red\x00 circle\x07 next to\x1b[31m a blue\x7f square\x0b"
    [result] = extractor.analyze([caption])
    assert [p.text for p in result.phrases] == ["a red\x00 circle", "a blue\x7f square"]
    assert all(caption[p.start : p.end] == p.text for p in result.phrases)
    french = "Un cercle rouge à côté d'un carré bleu sur la table"  # one function word of the old list
    assert [r.error for r in extractor.analyze([french, "a cat à la mode on the table"])] == [
        "not_english",
        None,
    ]


def test_repeated_phrases_are_kept_once(extractor: PhraseExtractor) -> None:
    [found] = extractor(["A cat. a cat. A CAT on a mat."])
    assert [p.text for p in found] == ["A cat", "a mat"]


def test_referring_expressions_grow_through_dependency_children() -> None:
    grown = PhraseExtractor(PhraseConfig(expand_referring_expressions=True))
    [found] = grown(["A dog in a field of flowers"])
    assert [p.text for p in found] == ["A dog in a field of flowers"]
    [found] = grown(["Stock photo of a cute cat on a sofa"])
    assert all(not _contains_word(p.text, w) for p in found for w in ("stock", "photo"))
    assert "a cute cat on a sofa" in [p.text for p in found]
    [found] = grown(["a dog and a cat"])  # a chunk with conjuncts is not grown
    assert [p.text for p in found] == ["a dog", "a cat"]


def test_config_overrides_and_validation() -> None:
    overrides = {"max_phrases_per_caption": "4", "expand_referring_expressions": "True"}
    config = replace_dotted(PhraseConfig(), overrides)
    assert config.max_phrases_per_caption == 4 and config.expand_referring_expressions is True
    assert config.digest() != PhraseConfig().digest()
    typed = replace_dotted(PhraseConfig(), {"max_phrases_per_caption": "8"}).max_phrases_per_caption
    assert typed == 8 and type(typed) is int
    with pytest.raises(KeyError, match="valid.*max_phrases_per_caption"):
        replace_dotted(PhraseConfig(), {"no_such_key": "1"})
    with pytest.raises(ValueError, match="max_phrases_per_caption"):
        replace_dotted(PhraseConfig(), {"max_phrases_per_caption": "many"})
    with pytest.raises(ValueError, match="max_phrases_per_caption"):
        replace_dotted(PhraseConfig(), {"max_phrases_per_caption": "1.5"})  # refused, not truncated
    with pytest.raises(ValueError):
        replace_dotted(PhraseConfig(), {"max_phrase_tokens": "0"})  # __post_init__ runs
    with pytest.raises(ValueError):
        PhraseConfig(max_phrase_tokens=0)
    with pytest.raises(TypeError):
        PhraseConfig(generic_words="stock")


def test_model_provenance_and_trimmed_pipeline(extractor: PhraseExtractor) -> None:
    provenance = extractor.provenance
    assert provenance["requested"] == "en_core_web_sm"
    assert provenance["version"] and provenance["spacy_version"]
    assert "parser" in extractor.nlp.pipe_names
    assert "ner" not in extractor.nlp.pipe_names and "lemmatizer" not in extractor.nlp.pipe_names
    with pytest.raises(OSError):
        PhraseExtractor(PhraseConfig(spacy_model="xx_no_such_model"))


# ---------------------------------------------------------------------------------------- record batches


def test_phrases_for_table_adds_typed_column_and_errors(extractor: PhraseExtractor) -> None:
    table = pa.table({"uid": ["a", "b", "c"], "caption": ["a red car on a road", "", None]})
    tables = phrases_for_table(table, extractor)
    assert tables.phrases.schema.field("phrases").type == PHRASES_TYPE
    assert tables.phrases.column("uid").to_pylist() == ["a", "b", "c"]
    first = tables.phrases.column("phrases").to_pylist()[0]
    assert [p["text"] for p in first] == ["a red car", "a road"] and first[0]["start"] == 0
    assert tables.errors == [
        {"uid": "b", "reason": "empty_caption"},
        {"uid": "c", "reason": "empty_caption"},
    ]


# ------------------------------------------------------------------------------------------- shard level

SHARD_CAPTIONS = [
    "Stock photo of a big red circle next to two blue squares, free HD wallpaper",
    "",
    "A man riding a horse on the beach",
    "Un chat noir sur le canapé avec une couverture rouge",
    "a bowl of fresh strawberries | Pinterest",
]


def _write_image_shard(layout: Layout, shard: str, captions: list[str]) -> list[str]:
    """The shard's ingest parquet: one row per caption, then one failed download; returns the uids."""
    urls = [f"http://127.0.0.1/{shard}/{i}.jpg" for i in range(len(captions) + 1)]
    table = pa.table(
        {
            "uid": [url_uid(u) for u in urls],
            "url": urls,
            "caption": captions + ["a failed download"],
            "sha256": [f"{i:064x}" for i in range(len(urls))],
            "width": [64] * len(urls),
            "height": [48] * len(urls),
            "status": ["success"] * len(captions) + ["failed_to_download"],
        }
    )
    storage.write_parquet(layout.fs, layout.image_shard(shard, ".parquet"), table)
    return table.column("uid").to_pylist()


def _phrase_table(layout: Layout, shard: str) -> pa.Table:
    return storage.read_parquet(layout.fs, layout.phrase_table(shard))


@pytest.fixture(params=["local", "memory"])
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Layout]:
    if request.param == "local":
        yield Layout(str(tmp_path / "out"))
        return
    layout = Layout(f"memory://phrases-test-{uuid.uuid4().hex}")
    yield layout
    if layout.fs.exists(layout.root):
        layout.fs.rm(layout.root, recursive=True)


def _ingested(layout: Layout) -> list[str]:
    """Two shards of partition part-a listed by its ingest entry; part-b has none (not ready)."""
    uids = _write_image_shard(layout, "part-a/00000", SHARD_CAPTIONS)
    _write_image_shard(layout, "part-a/00001", SHARD_CAPTIONS[2:])
    _write_image_shard(layout, "part-b/00000", SHARD_CAPTIONS)
    Ledger(layout, "ingest").record("part-a", {"shards": ["part-a/00000", "part-a/00001"]})
    return uids


def _run(layout: Layout, **options) -> graph.StageRun:
    return graph.run(layout, "phrases", PhraseConfig(), in_process=True, progress=False, **options)


def test_phrase_stage_on_a_root_is_idempotent(layout: Layout) -> None:
    uids = _ingested(layout)
    assert graph.pending(layout, "phrases") == ["part-a/00000", "part-a/00001"]
    result = _run(layout)
    assert list(result.results) == ["part-a/00000", "part-a/00001"] and result.complete
    table = _phrase_table(layout, "part-a/00000")
    validate(table, PHRASE_TABLE_SCHEMA)
    assert table.column_names == ["uid", "caption", "phrases"]
    assert table.column("uid").to_pylist() == uids[: len(SHARD_CAPTIONS)]  # the failed download is not there
    texts = [[p["text"] for p in row] for row in table.column("phrases").to_pylist()]
    assert texts[0] == ["a big red circle", "two blue squares"]
    assert texts[2] == ["A man", "a horse", "the beach"]
    errors = storage.read_parquet(layout.fs, layout.errors("phrases", "part-a/00000"))
    validate(errors, ERROR_SCHEMA)
    assert {(e["uid"], e["stage"], e["reason"]) for e in errors.to_pylist()} == {
        (uids[1], "phrases", "empty_caption"),
        (uids[3], "phrases", "not_english"),
    }
    assert errors.num_rows == 2
    second = storage.read_parquet(layout.fs, layout.errors("phrases", "part-a/00001"))
    assert second.column("reason").to_pylist() == ["not_english"]
    entry = Ledger(layout, "phrases").get("part-a/00000")
    assert entry == result.results["part-a/00000"].stats
    assert entry["rows"] == 5 and entry["phrases"] == sum(map(len, texts))
    assert entry["captions_with_phrases"] == sum(1 for t in texts if t)
    assert entry["errors"] == {"empty_caption": 1, "not_english": 1}
    assert entry["spacy"]["version"] and entry["config_hash"] == PhraseConfig().digest()
    assert not layout.fs.exists(layout.phrase_table("part-b/00000"))
    assert graph.pending(layout, "phrases") == []
    assert _run(layout).results == {}
    assert Ledger(layout, "phrases").units() == ["part-a/00000", "part-a/00001"]


def test_crash_before_the_ledger_entry_is_redone(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    _ingested(layout)
    _run(layout)
    expected = _phrase_table(layout, "part-a/00001")

    layout.fs.rm(layout.phrase_table("part-a/00001"))
    layout.fs.rm(layout.ledger_entry("phrases", "part-a/00001"))
    _write_image_shard(layout, "part-a/00002", SHARD_CAPTIONS[:2])
    shards = ["part-a/00000", "part-a/00001", "part-a/00002"]
    Ledger(layout, "ingest").record("part-a", {"shards": shards})

    def crash(self: Ledger, unit: str, entry: dict) -> dict:
        raise RuntimeError(f"killed before recording {unit}")

    monkeypatch.setattr(Ledger, "record", crash)
    crashed = _run(layout, max_attempts=2)
    assert crashed.failed == ["part-a/00001", "part-a/00002"]
    assert all("killed before recording" in crashed.results[unit].error for unit in crashed.failed)
    assert [crashed.results[unit].attempts for unit in crashed.failed] == [2, 2]
    assert layout.fs.exists(layout.phrase_table("part-a/00001"))  # outputs written, ledger not
    assert not layout.fs.exists(layout.ledger_entry("phrases", "part-a/00001"))
    assert graph.pending(layout, "phrases") == ["part-a/00001", "part-a/00002"]

    monkeypatch.undo()
    assert list(_run(layout).results) == ["part-a/00001", "part-a/00002"]
    assert _phrase_table(layout, "part-a/00001").equals(expected)
    assert graph.pending(layout, "phrases") == []


def test_extract_shard_writes_the_table_and_leaves_the_commit_to_the_executor(
    tmp_path: Path, extractor: PhraseExtractor
) -> None:
    layout = Layout(str(tmp_path))
    long = "a red kite over a green field " * 500  # 15k characters: over max_caption_chars
    captions = ["two red apples on a white plate", "", long]
    [uid, empty_uid, long_uid, _] = _write_image_shard(layout, "p/00007", captions)
    output = extract_shard(layout, "p/00007", extractor)
    assert isinstance(output, UnitOutput)
    assert output.errors == [{"uid": empty_uid, "reason": "empty_caption"}]
    assert output.stats["rows"] == 3 and output.stats["captions_with_phrases"] == 2
    assert output.stats["errors"] == {"empty_caption": 1} and output.stats["captions_truncated"] == 1
    assert output.stats["config_hash"] == extractor.config.digest()
    table = _phrase_table(layout, "p/00007")
    assert table.column("uid").to_pylist() == [uid, empty_uid, long_uid]
    assert table.column("caption").to_pylist()[2] == long, "the caption itself is kept whole"
    assert [p["text"] for p in table.column("phrases").to_pylist()[2]] == ["a red kite", "a green field"]
    assert not [p for p in (tmp_path / "phrases/p").iterdir() if ".tmp-" in p.name]
    assert not Ledger(layout, "phrases").is_done("p/00007"), "the executor records the unit, not the worker"
    assert not layout.fs.exists(layout.errors("phrases", "p/00007"))


# ----------------------------------------------------------------------------------------------- the job


def test_stdin_round_trip() -> None:
    captions = [
        "Stock photo of a red car, free HD wallpaper",
        "",
        "🐶 my dog 🐶 sleeping on the couch #cute",
        "Ein roter Hund spielt mit dem Ball im Garten",
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "jobs.phrases", "--stdin"],
        input="\n".join(captions) + "\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=REPO,
        timeout=120,
        check=True,
    )
    records = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [r["caption"] for r in records] == captions
    assert [r["error"] for r in records] == [None, "empty_caption", None, "not_english"]
    assert [p["text"] for p in records[0]["phrases"]] == ["a red car"]
    assert [p["text"] for p in records[2]["phrases"]] == ["my dog", "the couch"]
    for record in records:
        for phrase in record["phrases"]:
            assert record["caption"][phrase["start"] : phrase["end"]] == phrase["text"]


def test_job_main_runs_a_memory_root_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs import phrases as job

    layout = Layout(f"memory://phrases-job-{uuid.uuid4().hex}")
    try:
        _write_image_shard(layout, "p/00000", SHARD_CAPTIONS)
        Ledger(layout, "ingest").record("p", {"shards": ["p/00000"]})
        argv = ["--root", layout.url, "--set", "phrases.max_phrases_per_caption=1", "--quiet"]
        assert job.main(argv) == 0
        assert not ray.is_initialized(), "a memory:// root is run in this process, not on Ray"
        assert "phrases: 1 unit(s), 0 failed" in capsys.readouterr().out
        rows = _phrase_table(layout, "p/00000").column("phrases").to_pylist()
        texts = [[p["text"] for p in row] for row in rows]
        assert texts[0] == ["a big red circle"] and max(map(len, texts)) == 1
        entry = Ledger(layout, "phrases").get("p/00000")
        assert entry["config_hash"] == PhraseConfig(max_phrases_per_caption=1).digest()
        for bad in (
            "phrases.no_such_key=1",
            "phrases.max_phrases_per_caption=many",
            "max_phrases_per_caption=1",
        ):
            with pytest.raises(SystemExit) as exit_:
                job.main(["--root", layout.url, "--set", bad])
            assert exit_.value.code == 2
        assert "valid" in capsys.readouterr().err
    finally:
        layout.fs.rm(layout.root, recursive=True)
