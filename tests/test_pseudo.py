"""The student's reader of pseudo-label shards: kept boxes above a read-time threshold, images by byte range
out of the label tars (or the image shards, for label-only tars), excluded uids left out."""

from __future__ import annotations

import io
import random

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from transformers import AutoTokenizer

from glip.pretrained import minilm_path
from glip.prompts import tokenize_prompts
from jobs.round import with_repeat_factors
from pipeline import storage, tars
from pipeline.exports import Keep, keep_above
from pipeline.label import label_stage
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.schema import LABEL_SCHEMA, url_uid
from student.data import (
    BatchBuilder,
    GroundedImage,
    concept_dictionary,
    concept_of,
    concept_repeat_factor,
    make_example,
    read_image_at,
    record_image,
    repeat_factors,
    screen_negatives,
)
from student.paste import paste_pool
from student.pseudo import ignore_band, iter_pseudo_labels, load_pseudo_labels, unlabelled_spans
from student.train import Source

TEACHER = "t-0123456789"
CAPTION = "a red circle and a blue square"  # phrases: [0, 12) and [17, 30)


def _jpeg(width: int, height: int, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (value, 40, 200 - value)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _row(uid: str, shard: str, width: int, height: int, scores: list[float]) -> dict:
    boxes = [{"phrase": i % 2, "x0": 2.0 + i, "y0": 3.0, "x1": 30.0 + i, "y1": 40.0, "score": s}
             for i, s in enumerate(scores)]  # fmt: skip
    return {"uid": uid, "url": None, "sha256": None, "source_shard": shard, "width": width, "height": height,
            "caption": CAPTION, "phrases": [{"text": "a red circle", "start": 0, "end": 12},
                                            {"text": "a blue square", "start": 17, "end": 30}],
            "boxes": boxes, "teacher": TEACHER, "config_hash": "c",
            "created_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip


def _labelled_root(root: str, label_only: bool) -> tuple[Layout, dict[str, tuple[int, int, bytes]]]:
    """Two finished label shards and one unfinished; returns ``uid -> (width, height, jpeg)``."""
    layout = Layout(root)
    images: dict[str, tuple[int, int, bytes]] = {}
    for number, scores_per_row in enumerate([[[0.9, 0.4], [0.2]], [[0.6], [0.7, 0.8, 0.45]], [[0.99]]]):
        shard = f"day1/{number:05d}"
        rows, ingest_rows, label_samples, image_samples = [], [], [], []
        for index, scores in enumerate(scores_per_row):
            uid = url_uid(f"http://example.com/{number}/{index}.jpg")
            width, height = 48 + 8 * index, 64 + 4 * number
            images[uid] = (width, height, _jpeg(width, height, 30 * index + number))
            rows.append(_row(uid, shard, width, height, scores))
            key = f"{number:04d}{index:05d}"
            ingest_rows.append({"key": key, "uid": uid})
            image_samples.append({"__key__": key, "jpg": images[uid][2], "txt": CAPTION.encode()})
            label_samples.append(
                {"__key__": uid, "json": b"{}", **({} if label_only else {"jpg": images[uid][2]})}
            )
        table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["uid"]), schema=LABEL_SCHEMA)
        storage.write_parquet(layout.fs, layout.label_shard(TEACHER, shard, ".parquet"), table)
        tars.write_samples(
            layout.fs,
            layout.label_shard(TEACHER, shard, ".tar"),
            sorted(label_samples, key=lambda s: s["__key__"]),
        )
        tars.write_samples(layout.fs, layout.image_shard(shard, ".tar"), image_samples)
        storage.write_parquet(
            layout.fs, layout.image_shard(shard, ".parquet"), pa.Table.from_pylist(ingest_rows)
        )
        if number < 2:  # the third shard has no ledger entry: unfinished, never read
            Ledger(layout, label_stage(TEACHER)).record(shard, {})
    return layout, images


@pytest.mark.parametrize("label_only", [False, True], ids=["images-in-label-tars", "label-only-tars"])
def test_records_hold_the_kept_boxes_and_read_their_images(tmp_path, label_only: bool) -> None:
    layout, images = _labelled_root(str(tmp_path / "root"), label_only)
    records = load_pseudo_labels(layout, TEACHER, threshold=0.5)
    # Kept above 0.5: row 0/0 (0.9), 1/0 (0.6), 1/1 (0.7, 0.8); row 0/1 (0.2 only) and shard 2 (unfinished) not.
    assert sorted(len(r.boxes) for r in records) == [1, 1, 2]
    for record in records:
        width, height, jpeg = next(v for v in images.values() if v[:2] == (record.width, record.height))
        image = record_image(record)
        assert image.size == (width, height)
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
        assert record.caption == CAPTION and len(record.box_spans) == len(record.boxes)
        assert all(spans[0] in ((0, 12), (17, 30)) for spans in record.box_spans)
    assert len(load_pseudo_labels(layout, TEACHER, threshold=0.3)) == 3  # 0.4 is above 0.3: still 3 rows
    assert len(load_pseudo_labels(layout, TEACHER, threshold=0.95)) == 0
    # Streamed into a paste pool (a pasting round): the same objects, each readable by its byte range.
    pool = paste_pool(iter_pseudo_labels(layout, TEACHER, threshold=0.5), rate=1.0)
    assert list(pool.instances) == list(paste_pool(records, rate=1.0).instances)
    assert len(pool.instances) == 4 and pool.instances.pseudo_images == 3
    for instance in pool.instances:
        assert instance.pseudo and instance.concept in ("red circle", "blue square")
        assert read_image_at(instance.image_path, instance.image_range).size in [
            v[:2] for v in images.values()
        ]


def test_excluded_uids_never_reach_training_and_records_make_batches(tmp_path) -> None:
    layout, images = _labelled_root(str(tmp_path / "root"), label_only=False)
    every = load_pseudo_labels(layout, TEACHER, threshold=0.5)
    excluded = url_uid("http://example.com/1/1.jpg")
    kept = load_pseudo_labels(layout, TEACHER, threshold=0.5, exclude_uids={excluded})
    assert len(kept) == len(every) - 1
    assert all((r.width, r.height) != images[excluded][:2] for r in kept)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # bert-base-uncased vocabulary, shipped offline
    rng = random.Random(0)
    examples = [make_example(record, None, tokenizer, rng) for record in kept]
    batch = BatchBuilder(tokenizer, min_size=64, max_size=96)(examples, rng)
    assert batch.images.shape[0] == len(kept) and [len(b) for b in batch.boxes] == [
        len(r.boxes) for r in kept
    ]


def test_ignore_band_and_unlabelled_phrases_are_read_with_the_kept_boxes_unchanged(tmp_path) -> None:
    layout, _ = _labelled_root(str(tmp_path / "root"), label_only=False)
    plain = load_pseudo_labels(layout, TEACHER, threshold=0.5)
    options = load_pseudo_labels(layout, TEACHER, threshold=0.5, ignore_low=0.3, unlabelled_phrases=True)
    assert len(options) == len(plain) == 3 and all(r.pseudo for r in plain + options)
    for record, base in zip(options, plain, strict=True):
        assert np.array_equal(record.boxes, base.boxes) and record.box_spans == base.box_spans
        assert (record.image_path, record.image_range, record.image_id) == (
            base.image_path,
            base.image_range,
            base.image_id,
        )
        assert base.ignore_boxes is None and base.ignore_spans is None and base.unlabelled_spans is None
    by_scores = {len(r.boxes) + len(r.ignore_boxes): r for r in options}
    # Row 0/0 (0.9 kept, 0.4 in the band, phrases 0 and 1): the blue square is in the band and unlabelled.
    first = next(r for r in options if len(r.boxes) == 1 and len(r.ignore_boxes) == 1)
    assert first.ignore_boxes.tolist() == [[3.0, 3.0, 31.0, 40.0]] and first.ignore_spans == (((17, 30),),)
    assert first.unlabelled_spans == (((17, 30),),)
    # Row 1/1 (0.7, 0.8 kept for both phrases; 0.45 in the band): no unlabelled phrase.
    assert by_scores[3].ignore_spans == (((0, 12),),) and by_scores[3].unlabelled_spans == ()
    # Row 1/0 (0.6 kept): an empty band, the blue square unlabelled.
    last = next(r for r in options if len(r.boxes) == 1 and len(r.ignore_boxes) == 0)
    assert last.ignore_boxes.shape == (0, 4) and last.unlabelled_spans == (((17, 30),),)
    only_unlabelled = load_pseudo_labels(layout, TEACHER, threshold=0.5, unlabelled_phrases=True)
    assert all(r.ignore_boxes is None for r in only_unlabelled)
    assert [r.unlabelled_spans for r in only_unlabelled] == [r.unlabelled_spans for r in options]
    with pytest.raises(ValueError, match="below the lowest kept score"):
        iter_pseudo_labels(layout, TEACHER, threshold=0.5, ignore_low=0.5)  # when called, not when read


def test_a_phrases_best_box_is_kept_below_the_threshold_and_leaves_the_band(tmp_path) -> None:
    layout, _ = _labelled_root(str(tmp_path / "root"), label_only=False)
    rule = Keep(0.5, phrase_best=0.35)
    records = load_pseudo_labels(layout, TEACHER, rule, ignore_low=0.3, unlabelled_phrases=True)
    # Row 0/0: the blue square's only box (0.4) is its phrase's best: kept; nothing left in the band, no
    # phrase unlabelled. Row 1/1: 0.45 is the red circle's second box (0.7 is its best): in the band.
    by_boxes = sorted(records, key=lambda r: (len(r.boxes), len(r.ignore_boxes)))
    assert [(len(r.boxes), len(r.ignore_boxes)) for r in by_boxes] == [(1, 0), (2, 0), (2, 1)]
    first = next(r for r in records if r.boxes.tolist() == [[2.0, 3.0, 30.0, 40.0], [3.0, 3.0, 31.0, 40.0]])
    assert first.unlabelled_spans == () and first.box_spans == (((0, 12),), ((17, 30),))
    assert by_boxes[2].ignore_spans == (((0, 12),),) and by_boxes[0].unlabelled_spans == (((17, 30),),)
    with pytest.raises(ValueError, match="below the lowest kept score"):
        load_pseudo_labels(layout, TEACHER, rule, ignore_low=0.35)
    with pytest.raises(ValueError, match="must not exceed the threshold"):
        Keep(0.5, phrase_best=0.6)


def test_band_edges_compare_in_float32_like_the_keep_threshold() -> None:
    edge = float(np.float32(0.3))  # above 0.3 as a double, equal to it in float32: not kept at 0.3
    row = _row("u", "s", 64, 64, [0.9, edge, 0.2])
    table = pa.Table.from_pylist([row], schema=LABEL_SCHEMA)
    assert [b["score"] for b in keep_above(table, 0.3).to_pylist()[0]["boxes"]] == [pytest.approx(0.9)]
    boxes, spans = ignore_band(row, threshold=0.3, ignore_low=0.1)
    assert boxes.dtype == np.float32 and boxes.tolist() == [[3.0, 3.0, 31.0, 40.0], [4.0, 3.0, 32.0, 40.0]]
    assert spans == (((17, 30),), ((0, 12),))
    assert ignore_band(row, threshold=0.3, ignore_low=0.2)[0].tolist() == [[3.0, 3.0, 31.0, 40.0]]
    assert unlabelled_spans(row, threshold=0.3) == (((17, 30),),)
    assert unlabelled_spans(row, threshold=0.95) == (((0, 12),), ((17, 30),))


def _grounding(
    caption: str,
    boxed: list[tuple[int, int]],
    unlabelled: list[tuple[int, int]] = (),
    image: str = "unread.jpg",
) -> GroundedImage:
    return GroundedImage(
        image_path=image, width=64, height=64, boxes=np.zeros((len(boxed), 4), np.float32),
        caption=caption, box_spans=tuple(((s, e),) for s, e in boxed),
        unlabelled_spans=tuple(((s, e),) for s, e in unlabelled) or None, pseudo=True,
    )  # fmt: skip


def test_concepts_drop_openers_and_plurals_and_the_dictionary_counts_boxed_images() -> None:
    assert concept_of("Two big blue crosses") == "big blue cross"
    assert concept_of("3 green circles") == "green circle" and concept_of("a glass") == "glass"
    assert concept_of("the") == ""
    records = [
        _grounding("two red hexagons and a blue star", [(0, 16), (21, 32)]),
        _grounding("a red hexagon near the window", [(0, 13)], [(19, 29)]),
        _grounding("a blue stars", [(0, 12)]),
        _grounding("a green circcle", [(0, 15)]),  # a one-off spelling: one image only
    ]
    # "window" has no box anywhere; "green circcle" is in one image: neither is a concept.
    assert concept_dictionary(records) == ["blue star", "red hexagon"]
    assert concept_dictionary(records, min_images=1) == ["blue star", "green circcle", "red hexagon"]


def test_caption_negatives_never_name_what_the_caption_names_and_are_negative_tokens(tmp_path) -> None:
    pool = ["big yellow hexagon", "yellow hexagon", "red circle", "blue square", "green star", "hexagon"]
    (tmp_path / "image.jpg").write_bytes(_jpeg(64, 64, 90))
    record = _grounding(
        "a yellow hexagon and a red circle", [(0, 16)], [(21, 33)], str(tmp_path / "image.jpg")
    )
    # More or less specific than a phrase of the caption (kept or unlabelled) may name its object: screened.
    assert screen_negatives(record, pool) == ["blue square", "green star"]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    plain = make_example(record, None, tokenizer, random.Random(0))
    drawn = set()
    for seed in range(20):
        example = make_example(record, None, tokenizer, random.Random(seed), max_negatives=2, negatives=pool)
        assert example.prompt.caption.startswith(record.caption + ". ")
        assert example.prompt.spans[: plain.prompt.num_phrases] == plain.prompt.spans
        negatives = example.prompt.phrase_texts()[plain.prompt.num_phrases :]
        assert 1 <= len(negatives) <= 2 and set(negatives) <= {"blue square", "green star"}
        assert example.prompt.phrase_ids[plain.prompt.num_phrases :] == (-1,) * len(negatives)
        assert np.array_equal(example.box_phrase, plain.box_phrase)
        drawn |= set(negatives)
        batch = BatchBuilder(tokenizer, min_size=64, max_size=96)([example], random.Random(seed))
        # The box's targets are its own tokens only; the negatives' tokens count in the loss (not masked).
        tokenized = tokenize_prompts(tokenizer, [example.prompt])
        negative_tokens = [
            t for row in tokenized.prompts[0].token_indices[plain.prompt.num_phrases :] for t in row
        ]
        assert negative_tokens and not batch.positive_maps[0][:, negative_tokens].any()
        assert batch.token_loss_masks[0][negative_tokens].all()
    assert drawn == {"blue square", "green star"}
    # The same seed, the same prompt: batches stay a function of (seed, step).
    again = make_example(record, None, tokenizer, random.Random(3), max_negatives=2, negatives=pool)
    assert again == make_example(record, None, tokenizer, random.Random(3), max_negatives=2, negatives=pool)


def test_repeat_factors_weight_pseudo_images_by_what_the_human_set_lacks() -> None:
    names = ["blue cross", "red circle"]
    # 10 human detection images: 8 show a blue cross, 1 a red circle, 1 both.
    human = [_detection([0])] * 8 + [_detection([1]), _detection([0, 1])]
    pseudo = [
        _grounding("a big blue cross", [(0, 16)]),  # "blue cross" counts for "big blue cross": 9 of 10
        _grounding("two red circles", [(0, 15)]),  # 2 of 10
        _grounding("a red circle and a blue cross", [(0, 12), (17, 29)]),  # its rarest concept decides
        _grounding("a green star", [(0, 12)]),
        _grounding("three green stars", [(0, 17)]),  # never in the human set: the largest factor
        _grounding("a green squae", [(0, 13)]),  # a one-off spelling: 1
        _grounding("a big blue cross", [(0, 16)]),
    ]
    factors = repeat_factors(pseudo, [(human, names)], 0.5)
    expected = [1.0, (0.5 / 0.2) ** 0.5, (0.5 / 0.2) ** 0.5, 5**0.5, 5**0.5, 1.0, 1.0]
    assert factors == pytest.approx(expected)
    # The human set's own factors (detection records, their category names).
    assert repeat_factors(human[-2:], [(human, names)], 0.5, names) == pytest.approx([(0.5 / 0.2) ** 0.5] * 2)
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors(pseudo, [(human, names)], 0.0)
    # A round's runs: every source weighted, the frequencies read off the run's whole training set (here the 10
    # human images and the 7 pseudo-labelled ones: "red circle" in 4 of 17, "green star" in 2 of 17).
    human_source, crawl = with_repeat_factors([Source(human, names), Source(pseudo)], 0.5)
    assert crawl.weights[1] == pytest.approx((0.5 / (4 / 17)) ** 0.5)
    assert crawl.weights[3] == pytest.approx((0.5 / (2 / 17)) ** 0.5) and human_source.weights[0] == 1.0
    assert with_repeat_factors([Source(human, names)], None)[0].weights is None


def test_concept_frequencies_are_those_of_a_pass_over_the_reference() -> None:
    """The indexed count (a concept's subsets filed under their rarest word) against the definition: the
    records with a concept whose words are all the query's, on random worlds of overlapping word sets."""
    rng = random.Random(7)
    words = [f"w{i}" for i in range(12)]
    for _ in range(20):
        names = [" ".join(rng.sample(words, rng.randint(1, 3))) for _ in range(15)]
        human = [_detection(rng.sample(range(15), rng.randint(1, 3))) for _ in range(rng.randint(1, 40))]
        human += [_detection([])]  # a record without a concept counts in the denominator only
        factor = concept_repeat_factor([(human, names)], 0.5)
        for _ in range(30):
            query = frozenset(rng.sample(words, rng.randint(1, 5)))
            count = sum(
                any(set(names[label].split()) <= query for label in record.labels) for record in human
            )
            expected = max(1.0, (0.5 * len(human) / max(count, 1)) ** 0.5)
            assert factor(" ".join(sorted(query))) == pytest.approx(expected, rel=1e-12)


def _detection(labels: list[int]) -> GroundedImage:
    return GroundedImage("unread.jpg", 64, 64, np.zeros((len(labels), 4), np.float32), labels=tuple(labels))
