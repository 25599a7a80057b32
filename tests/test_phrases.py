"""The phrase stage: filters on messy web captions, record batches, shards on fsspec roots, the job."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import phrases as phrase_stage
from pipeline.ledger import Ledger
from pipeline.phrases import (
    PHRASES_TYPE,
    PhraseConfig,
    PhraseExtractor,
    clean_caption,
    extract_shard,
    pending_shards,
    phrases_for_table,
    run_phrases,
)

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
    config = PhraseConfig().with_overrides(["max_phrases_per_caption=4", "expand_referring_expressions=True"])
    assert config.max_phrases_per_caption == 4 and config.expand_referring_expressions is True
    assert config.digest() != PhraseConfig().digest()
    with pytest.raises(KeyError, match="valid"):
        PhraseConfig().with_overrides(["no_such_key=1"])
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
    assert tables.errors.to_pylist() == [
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


def _write_image_shard(root: str, shard: str, captions: list[str]) -> None:
    fs, path = fsspec.core.url_to_fs(root)
    urls = [f"http://127.0.0.1/{shard}/{i}.jpg" for i in range(len(captions) + 1)]
    table = pa.table(
        {
            "uid": [hashlib.sha256(u.encode()).hexdigest()[:16] for u in urls],
            "url": urls,
            "caption": captions + ["a failed download"],
            "sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(len(urls))],
            "width": [64] * len(urls),
            "height": [48] * len(urls),
            "status": ["success"] * len(captions) + ["failed_to_download"],
        }
    )
    fs.makedirs(f"{path}/images/{shard.rsplit('/', 1)[0]}", exist_ok=True)
    with fs.open(f"{path}/images/{shard}.parquet", "wb") as handle:
        pq.write_table(table, handle)


def _read(root: str, relative: str) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(root)
    with fs.open(f"{path}/{relative}", "rb") as handle:
        return pq.read_table(handle)


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    url = f"memory://phrases-test-{uuid.uuid4().hex}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _ingested(root: str) -> None:
    _write_image_shard(root, "part-a/00000", SHARD_CAPTIONS)
    _write_image_shard(root, "part-a/00001", SHARD_CAPTIONS[2:])
    _write_image_shard(root, "part-b/00000", SHARD_CAPTIONS)  # no ingest entry: not ready
    Ledger(root, "ingest").record("part-a", {"shards": 2})


def test_run_phrases_on_a_root_is_idempotent(root: str, extractor: PhraseExtractor) -> None:
    _ingested(root)
    assert pending_shards(root) == ["part-a/00000", "part-a/00001"]
    assert run_phrases(root, extractor=extractor) == ["part-a/00000", "part-a/00001"]
    table = _read(root, "phrases/part-a/00000.parquet")
    assert table.column_names == ["uid", "caption", "phrases"]
    assert table.num_rows == len(SHARD_CAPTIONS)  # the failed download is not there
    texts = [[p["text"] for p in row] for row in table.column("phrases").to_pylist()]
    assert texts[0] == ["a big red circle", "two blue squares"]
    assert texts[2] == ["A man", "a horse", "the beach"]
    errors = _read(root, "phrases/part-a/00000.errors.parquet").to_pylist()
    assert [e["reason"] for e in errors] == ["empty_caption", "not_english"]
    entry = Ledger(root, "phrases").get("part-a/00000")
    assert entry["rows"] == 5 and entry["phrases"] == sum(map(len, texts))
    assert entry["errors"] == {"empty_caption": 1, "not_english": 1}
    assert entry["spacy"]["version"] and entry["config_hash"] == extractor.config.digest()
    assert run_phrases(root, extractor=extractor) == []
    assert Ledger(root, "phrases").units() == ["part-a/00000", "part-a/00001"]


def test_crash_before_the_ledger_entry_is_redone(
    root: str, extractor: PhraseExtractor, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ingested(root)
    run_phrases(root, extractor=extractor)
    expected = _read(root, "phrases/part-a/00001.parquet")

    fs, path = fsspec.core.url_to_fs(root)
    fs.rm(f"{path}/phrases/part-a/00001.parquet")
    fs.rm(f"{path}/ledger/phrases/part-a/00001.json")
    _write_image_shard(root, "part-a/00002", SHARD_CAPTIONS[:2])

    def crash(self: Ledger, unit: str, entry: dict) -> dict:
        raise RuntimeError(f"killed before recording {unit}")

    monkeypatch.setattr(Ledger, "record", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_phrases(root, extractor=extractor)
    assert fs.exists(f"{path}/phrases/part-a/00001.parquet")  # outputs written, ledger not
    assert pending_shards(root) == ["part-a/00001", "part-a/00002"]

    monkeypatch.undo()
    assert run_phrases(root, extractor=extractor) == ["part-a/00001", "part-a/00002"]
    assert _read(root, "phrases/part-a/00001.parquet").equals(expected)
    assert pending_shards(root) == []


def test_extract_shard_is_importable_and_pure(tmp_path: Path, extractor: PhraseExtractor) -> None:
    root = str(tmp_path)
    _write_image_shard(root, "p/00007", ["two red apples on a white plate"])
    entry = extract_shard(root, "p/00007", extractor)
    assert entry["unit"] == "p/00007" and entry["stage"] == phrase_stage.STAGE
    assert entry["captions_with_phrases"] == 1
    assert list((tmp_path / "phrases/p").iterdir()) != []
    assert not [p for p in (tmp_path / "phrases/p").iterdir() if ".tmp-" in p.name]


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


def test_job_main_runs_the_root(tmp_path: Path) -> None:
    from jobs import phrases as job

    root = str(tmp_path)
    _write_image_shard(root, "p/00000", SHARD_CAPTIONS)
    Ledger(root, "ingest").record("p", {})
    assert job.main(["--root", root, "--set", "max_phrases_per_caption=1"]) == 0
    rows = _read(root, "phrases/p/00000.parquet").column("phrases").to_pylist()
    texts = [[p["text"] for p in row] for row in rows]
    assert texts[0] == ["a big red circle"] and max(map(len, texts)) == 1
    with pytest.raises(SystemExit):
        job.main(["--root", root, "--set", "no_such_key=1"])
