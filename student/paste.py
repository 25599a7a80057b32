"""Copy-paste of pseudo-labelled objects into human-annotated images (X-Paste's idea, Zhao et al. 2023, with a
teacher's boxes instead of masks; Simple Copy-Paste, Ghiasi et al. 2021).

A round's student that draws whole pseudo-labelled images gives up the human draws they replace: at a fixed
batch size, every crawl image in a batch is a human image the baseline sees and the student does not. Pasting
keeps the student's batches the baseline's images (the same images in the same order) and adds objects from the
crawl to them: a kept pseudo box is cut out of its image (the box, its border feathered) and pasted at a free
place of a human image, with its phrase added to the image's prompt (detection records: the category whose
words the phrase's concept contains; grounding records: the concept appended to the caption). Objects are drawn
by weight (e.g. LVIS repeat factors of their concepts against the human set, so the crawl fills what the human
set lacks).

Pastes are drawn with their own generator, seeded by (seed, step, slot) in ``student.train.StepBatches``, so
which images a step draws does not depend on them; a pasted phrase changes the prompt draws of its image, and
the flips and sizes drawn after it in the batch may differ from the run without pasting.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from student.data import GroundedImage, Paste, _phrase_text, concept_of, concept_repeat_factor

# A pasted object may cover at most this fraction of an object already in the image (and the reverse).
MAX_COVER = 0.2
PLACEMENT_TRIES = 10


@dataclass(frozen=True)
class Instance:
    """One pasteable object: box ``box`` of ``record`` (a pseudo-labelled or human-annotated image), named
    ``concept``."""

    record: GroundedImage
    box: int
    concept: str


@dataclass(frozen=True)
class PastePool:
    """Objects to paste into a source's images: each image gets pastes with probability ``rate``, from 1 to
    ``per_image`` of them, drawn by ``weights`` (None: alike)."""

    instances: Sequence[Instance]
    rate: float
    per_image: int = 1
    weights: Sequence[float] | None = None
    _cumulative: tuple[float, ...] = dataclasses.field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.instances or not 0 < self.rate <= 1 or self.per_image < 1:
            raise ValueError(
                f"a paste pool needs instances, a rate in (0, 1] and per_image >= 1 (got {len(self.instances)} "
                f"instances, rate {self.rate}, per_image {self.per_image})"
            )
        weights = [1.0] * len(self.instances) if self.weights is None else list(self.weights)
        if len(weights) != len(self.instances) or min(weights) <= 0:
            raise ValueError(f"paste weights: one > 0 per instance ({len(self.instances)} instances)")
        object.__setattr__(self, "_cumulative", tuple(itertools.accumulate(weights)))

    def draw(self, rng: random.Random) -> Instance:
        point = rng.random() * self._cumulative[-1]
        return self.instances[min(bisect.bisect_right(self._cumulative, point), len(self.instances) - 1)]


def paste_instances(records: Sequence[GroundedImage], names: Sequence[str] | None = None) -> list[Instance]:
    """Every box of ``records`` with its concept: the concept of its phrase (grounding records, e.g. the kept
    pseudo-labels) or of its category name (detection records, ``names`` their vocabulary)."""
    instances = []
    for record in records:
        if record.labels is not None:
            concepts = [concept_of(names[label]) if names is not None else "" for label in record.labels]
        else:
            concepts = [
                concept_of(_phrase_text(record.caption or "", spans)) for spans in record.box_spans or ()
            ]
        instances += [Instance(record, index, concept) for index, concept in enumerate(concepts) if concept]
    return instances


def _name_of(concept: str, names: Sequence[str]) -> int | None:
    """The index of the longest category name whose words are all words of ``concept`` (None: no name)."""
    words = set(concept.split())
    fitting = [
        (len(name.split()), -i, i) for i, name in enumerate(names) if set(concept_of(name).split()) <= words
    ]
    return max(fitting)[2] if fitting else None


def _covers(a: np.ndarray, b: np.ndarray) -> float:
    """The larger of the fractions of ``a``'s and ``b``'s areas that their intersection covers."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    areas = [max((box[2] - box[0]) * (box[3] - box[1]), 1e-6) for box in (a, b)]
    return max(inter / areas[0], inter / areas[1])


def paste_into(
    record: GroundedImage, names: Sequence[str] | None, pool: PastePool, rng: random.Random
) -> GroundedImage:
    """``record`` with objects of ``pool`` pasted (``GroundedImage.pastes``; their boxes appended to its boxes,
    their phrases to its prompt), or ``record`` itself when the draw pastes nothing. An object is pasted only at
    a place where it and every box already there cover at most ``MAX_COVER`` of each other, and only into a
    detection record when a category name fits its concept."""
    if rng.random() >= pool.rate:
        return record
    boxes = [np.asarray(box, dtype=np.float32) for box in record.boxes]
    pastes: list[Paste] = []
    labels = list(record.labels) if record.labels is not None else None
    caption = record.caption
    spans = list(record.box_spans or ())
    for _ in range(rng.randint(1, pool.per_image)):
        instance = pool.draw(rng)
        label = None
        if labels is not None:
            label = _name_of(instance.concept, names or ())
            if label is None:
                continue
        x0, y0, x1, y1 = (float(v) for v in instance.record.boxes[instance.box])
        width, height = int(np.ceil(x1 - x0)), int(np.ceil(y1 - y0))
        if not (0 < width < record.width and 0 < height < record.height):
            continue
        for _ in range(PLACEMENT_TRIES):
            x, y = rng.randint(0, record.width - width), rng.randint(0, record.height - height)
            placed = np.asarray([x, y, x + width, y + height], dtype=np.float32)
            if all(_covers(placed, box) <= MAX_COVER for box in boxes):
                break
        else:
            continue
        pastes.append(Paste(instance.record, instance.box, x, y))
        boxes.append(placed)
        if labels is not None:
            labels.append(label)
            continue
        caption, phrase = _with_phrase(caption or "", spans, instance.concept)
        spans.append(phrase)
    if not pastes:
        return record
    return dataclasses.replace(
        record,
        boxes=np.stack(boxes).astype(np.float32).reshape(-1, 4),
        labels=tuple(labels) if labels is not None else None,
        caption=caption,
        box_spans=tuple(spans) if record.caption is not None else None,
        pastes=(*record.pastes, *pastes),
    )


def _with_phrase(caption: str, spans: list, concept: str) -> tuple[str, tuple]:
    """The caption naming ``concept`` and its phrase's spans: an existing phrase of the same concept, or the
    concept appended as a sentence of its own."""
    for phrase in spans:
        if concept_of(_phrase_text(caption, phrase)) == concept:
            return caption, phrase
    stripped = caption.rstrip()
    joined = (
        f"{stripped}. " if stripped and not stripped.endswith(".") else (f"{stripped} " if stripped else "")
    )
    start = len(joined)
    return f"{joined}{concept}.", ((start, start + len(concept)),)


def paste_pool(
    pseudo: Sequence[GroundedImage],
    rate: float,
    per_image: int = 1,
    reference: Sequence[tuple[Sequence[GroundedImage], Sequence[str] | None]] = (),
    threshold: float | None = None,
    min_images: int = 2,
    human: Sequence[tuple[Sequence[GroundedImage], Sequence[str] | None]] = (),
) -> PastePool | None:
    """The kept boxes of the ``pseudo`` records and the boxes of the ``human`` sources (``(records, names)``
    pairs) as a paste pool (None: no box at all), each weighted by the LVIS repeat factor of its concept against
    ``reference`` with ``threshold`` (None: alike). A pseudo-labelled concept boxed in fewer than ``min_images``
    images weighs 1, as in ``student.data.repeat_factors`` (a typo is not a gap); a human one is trusted. The
    same box of one image in two human sources (a detection and a grounding file of the same images) is one
    instance."""
    trusted: list[Instance] = []
    seen: set[tuple] = set()
    for records, names in human:
        for instance in paste_instances(records, names):
            key = (instance.record.image_path, instance.record.image_range,
                   tuple(np.round(instance.record.boxes[instance.box], 1).tolist()))  # fmt: skip
            if key not in seen:
                seen.add(key)
                trusted.append(instance)
    found = paste_instances(pseudo)
    instances = trusted + found
    if not instances:
        return None
    weights = None
    if threshold is not None:
        factor = concept_repeat_factor(reference, threshold)
        images: dict[str, set[int]] = {}
        for instance in found:
            images.setdefault(instance.concept, set()).add(id(instance.record))
        weights = [factor(i.concept) for i in trusted]
        weights += [factor(i.concept) if len(images[i.concept]) >= min_images else 1.0 for i in found]
    return PastePool(instances, rate, per_image, weights)
