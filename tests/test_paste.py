"""Copy-paste of pseudo-labelled objects into human images (student.paste): where objects land, what the
prompt says about them, what the pixels hold, and that a pasting run draws the images of a run without it."""

from __future__ import annotations

import dataclasses
import random
import weakref
from pathlib import Path

import numpy as np
import pytest

from glip.config import tiny, with_overrides
from glip.model import build_model
from jobs.round import RoundConfig
from jobs.world import WorldOptions, generate_world
from student.data import (
    BatchBuilder,
    _phrase_text,
    apply_pastes,
    concept_of,
    load_coco_detection,
    load_grounding,
    read_image_at,
    record_image,
)
from student.paste import MAX_COVER, Instance, _covers, box_concepts, paste_into, paste_pool
from student.train import Source, StepBatches


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(
        WorldOptions(
            out=str(out),
            long_tail=False,
            seed=5,
            train_images=12,
            eval_images=2,
            crawl_images=4,
            leaks=1,
            dead_urls=1,
            image_size=(200, 240),
            object_size=(30, 60),
            objects_per_image=(1, 2),
        )  # fmt: skip
    )
    return out


def _human(world: Path) -> list[Source]:
    records, names = load_coco_detection(world / "annotations/train_coco.json", world / "images/train")
    grounding = load_grounding(world / "annotations/train_grounding.json", world / "images/train")
    return [Source(records, names), Source(grounding)]


def _pseudo(world: Path):
    """Stand-ins for pseudo-labelled crawl images: the grounding records, marked pseudo."""
    grounding = load_grounding(world / "annotations/train_grounding.json", world / "images/train")
    return [dataclasses.replace(record, pseudo=True) for record in grounding]


def test_pasted_objects_land_free_named_and_with_their_pixels(world):
    detection, grounding = _human(world)
    pseudo = _pseudo(world)
    pool = paste_pool(pseudo, rate=1.0, per_image=2)
    sources: dict[tuple, set[str]] = {}  # (image, box) -> the concepts of its phrases
    for source in pseudo:
        for box, spans in zip(source.boxes, source.box_spans, strict=True):
            key = (source.image_path, tuple(float(v) for v in box))
            sources.setdefault(key, set()).add(concept_of(_phrase_text(source.caption, spans)))
    pasted = 0
    for source in (detection, grounding):
        for index, record in enumerate(source.records):
            result = paste_into(record, source.names, pool, random.Random(index))
            count = len(result.pastes)
            pasted += count
            assert len(result.boxes) == len(record.boxes) + count
            np.testing.assert_array_equal(result.boxes[: len(record.boxes)], record.boxes)
            for new in range(len(record.boxes), len(result.boxes)):
                others = [box for other, box in enumerate(result.boxes) if other != new]
                assert all(_covers(result.boxes[new], box) <= MAX_COVER for box in others)
                paste = result.pastes[new - len(record.boxes)]
                concept = paste.concept  # the concept of the phrase of that box of that pseudo-labelled image
                assert concept in sources[(paste.image_path, paste.box)]
                if source.names is not None:  # the category whose words the concept holds
                    assert set(source.names[result.labels[new]].split()) <= set(concept.split())
                else:  # the caption names it, the human caption kept as it was
                    assert result.caption.startswith(record.caption.rstrip(". "))
                    assert concept_of(_phrase_text(result.caption, result.box_spans[new])) == concept
            if count:
                image = apply_pastes(record_image(record), result.pastes)
                last = result.pastes[-1]
                x0, y0, x1, y1 = last.box
                source_pixel = read_image_at(last.image_path, last.image_range).getpixel(
                    (int((x0 + x1) / 2), int((y0 + y1) / 2))
                )
                centre = (last.x + int((x0 + x1) / 2) - int(np.floor(x0)),
                          last.y + int((y0 + y1) / 2) - int(np.floor(y0)))  # fmt: skip
                assert image.getpixel(centre) == source_pixel
    assert pasted >= len(detection.records)  # most images got an object, some two
    never = dataclasses.replace(pool, rate=1e-9)
    assert paste_into(grounding.records[0], None, never, random.Random(0)) is grounding.records[0]


def test_the_pool_is_every_named_box_in_order_and_holds_no_record(world):
    detection, grounding = _human(world)
    pseudo = _pseudo(world)
    alive = []

    def streamed():  # each record made as it is read, as iter_pseudo_labels makes them; only weak references kept
        for record in pseudo:
            copy = dataclasses.replace(record, boxes=record.boxes.copy())
            alive.append(weakref.ref(copy))
            yield copy

    human = [(detection.records, detection.names), (grounding.records, None)]
    pool = paste_pool(streamed(), 1.0, 1, human, 0.5, human=human)
    assert alive and all(ref() is None for ref in alive), "the pool holds records of the stream"
    expected, merged = [], set()
    for records, names, is_pseudo in ((detection.records, detection.names, False),
                                      (grounding.records, None, False), (pseudo, None, True)):  # fmt: skip
        for record in records:
            for box, concept in enumerate(box_concepts(record, names)):
                place = (record.image_path, tuple(np.round(record.boxes[box], 1).tolist()))
                if not concept or (not is_pseudo and place in merged):
                    continue  # nothing names it, or a human box already in (the same image, two annotation files)
                if not is_pseudo:
                    merged.add(place)
                boxes = tuple(float(v) for v in record.boxes[box])
                expected.append(Instance(record.image_path, record.image_range, boxes, concept, is_pseudo))
    assert list(pool.instances) == expected
    assert pool.instances.pseudo_images == len(pseudo)
    assert len(expected) > sum(len(r.boxes) for r in pseudo)  # the human boxes are in, once each
    assert len(expected) < sum(len(r.boxes) for r in (*detection.records, *grounding.records, *pseudo))
    # Rare concepts weigh more: a pseudo-labelled concept in one image only weighs 1 (a typo is not a gap).
    assert pool.weights.min() >= 1.0 and pool.weights.max() > 1.0
    once = {
        c for c, n in zip(pool.instances.concepts, pool.instances.concept_images(), strict=True) if n == 1
    }
    weighed = [(i.concept in once, w) for i, w in zip(pool.instances, pool.weights, strict=True) if i.pseudo]
    assert any(rare for rare, _ in weighed) and all(w == 1.0 for rare, w in weighed if rare)


def test_pasting_keeps_the_batches_of_the_run_without_it(world):
    config = with_overrides(tiny(), ["input.min_size=160", "input.max_size=224", "text.pad_to_max=False"])
    tokenizer = build_model(config, load_pretrained_text=False).tokenizer()
    builder = BatchBuilder(tokenizer, 160, 224, (160, 192), 32, 256, False, train=True, pseudo_box_loss=False)
    human = _human(world)
    pool = paste_pool(_pseudo(world), rate=0.5, per_image=1)
    pasting = [dataclasses.replace(source, paste=pool) for source in human]
    plain = StepBatches(human, builder, tokenizer, 4, 3, 0, 6, 5)
    pasted = StepBatches(pasting, builder, tokenizer, 4, 3, 0, 6, 5)
    unchanged = with_paste = 0
    for step in range(6):
        assert pasted.positions(step) == plain.positions(step)  # the same images, in the same order
        a, b = plain[step], pasted[step]
        for i, example in enumerate(b.examples):
            added = len(example.record.pastes)
            assert len(b.boxes[i]) == len(a.boxes[i]) + added
            if not added:
                unchanged += 1
                assert b.box_loss_masks is None or b.box_loss_masks[i] is None
                continue
            with_paste += 1
            mask = b.box_loss_masks[i]  # human boxes train every loss, pasted ones the token loss only
            assert mask.tolist() == [True] * len(a.boxes[i]) + [False] * added
    assert unchanged and with_paste


def test_round_options_refuse_a_student_without_the_crawl():
    with pytest.raises(ValueError, match="pseudo_share=0 without round.paste"):
        RoundConfig(paste=None)  # the default share (0) draws no whole pseudo-labelled image
    with pytest.raises(ValueError, match="round.paste"):
        RoundConfig(paste=1.5)
    RoundConfig(paste=None, pseudo_share=None)  # whole pseudo-labelled images, walked with the human ones
