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

import dataclasses
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from student.data import GroundedImage, Paste, _phrase_text, concept_of, concept_repeat_factor

# A pasted object may cover at most this fraction of an object already in the image (and the reverse).
MAX_COVER = 0.2
PLACEMENT_TRIES = 10
_DIGEST_ROWS = 1 << 20  # boxes hashed a slice at a time (32 MiB of float64)


@dataclass(frozen=True)
class Instance:
    """One pasteable object: the box ``box`` (continuous xyxy original pixels) of the image at ``image_path``
    (``image_range``: its bytes in a tar shard, as in ``GroundedImage``), named ``concept``; ``pseudo``: a
    teacher's box, not a human one."""

    image_path: str
    image_range: tuple[int, int] | None
    box: tuple[float, float, float, float]
    concept: str
    pseudo: bool


class InstanceTable(Sequence[Instance]):
    """Pasteable objects as columns, without the records they were read from: per image its file (an index
    into ``paths``), byte range (``-1, -1``: a file of its own) and whether it is pseudo-labelled; per object its
    image, box (float32) and concept (an index into ``concepts``). An object's row is 24 B and an image's 21 B: a
    pasting round's pool held 59 B an object on the seed-0 demo root (weights and concept names included), where
    the records it was read from hold ~1.6 KB an image, so the pool of a 24M-image crawl (~2.4 GB) fits every
    trainer (``bench/pool_memory.py``). Item ``i`` is an ``Instance`` made on the fly. Built by
    ``InstanceTable.of``."""

    def __init__(self, paths: Sequence[str], concepts: Sequence[str], image_path: np.ndarray,
                 image_range: np.ndarray, image_pseudo: np.ndarray, object_image: np.ndarray,
                 object_box: np.ndarray, object_concept: np.ndarray) -> None:  # fmt: skip
        self.paths, self.concepts = list(paths), list(concepts)
        self.image_path, self.image_range, self.image_pseudo = image_path, image_range, image_pseudo
        self.object_image, self.object_box, self.object_concept = object_image, object_box, object_concept

    @classmethod
    def of(
        cls, sources: Iterable[tuple[Iterable[GroundedImage], Sequence[str] | None, bool]]
    ) -> InstanceTable:
        """Every box of every record of ``sources`` (``(records, names, merge)``: ``records`` read once, as they
        come, so a generator of records is never held whole; ``names`` the vocabulary of detection records)
        with its concept: the concept of its phrase (grounding records, e.g. the kept pseudo-labels) or of its
        category name (detection records). Boxes without a concept are left out. With ``merge``, a box of an
        image already seen with ``merge`` at the same place (a detection and a grounding file of the same
        images) is left out too."""
        builder = _TableBuilder()
        for records, names, merge in sources:
            for record in records:
                builder.add(record, names, merge)
        return builder.table()

    def __len__(self) -> int:
        return len(self.object_image)

    def __getitem__(self, index: Any) -> Instance:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"an InstanceTable is indexed by an int, not {type(index).__name__}")
        image = int(self.object_image[index])  # IndexError past the end ends iteration
        offset, size = (int(v) for v in self.image_range[image])
        return Instance(
            self.paths[self.image_path[image]],
            None if offset < 0 else (offset, size),
            tuple(float(v) for v in self.object_box[index]),
            self.concepts[self.object_concept[index]],
            bool(self.image_pseudo[image]),
        )

    @property
    def object_pseudo(self) -> np.ndarray:
        """``[O]`` bool: the object is a teacher's (its image is pseudo-labelled)."""
        return self.image_pseudo[self.object_image]

    @property
    def pseudo_images(self) -> int:
        """The pseudo-labelled images read (those without a pasteable box included)."""
        return int(self.image_pseudo.sum())

    def concept_images(self, pseudo: bool = True) -> np.ndarray:
        """``[C]`` int64: per concept, the number of images (pseudo-labelled ones, or human ones) with an
        object of it."""
        chosen = self.object_pseudo == pseudo
        pairs = np.unique(
            self.object_image[chosen].astype(np.int64) * len(self.concepts) + self.object_concept[chosen]
        )
        return np.bincount(pairs % max(len(self.concepts), 1), minlength=len(self.concepts))

    def update_digest(self, digest: Any) -> None:
        """Feed ``digest`` (a ``hashlib`` object) what pasting reads: image file names (a root moved elsewhere
        hashes alike), ranges, pseudo flags, boxes to 0.01 px, concepts."""
        digest.update("\n".join(Path(path).name for path in self.paths).encode() + b"\0")
        digest.update("\n".join(self.concepts).encode() + b"\0")
        for column in (self.image_path, self.image_range, self.image_pseudo, self.object_image,
                       self.object_concept):  # fmt: skip
            digest.update(np.ascontiguousarray(column))
        for start in range(0, len(self.object_box), _DIGEST_ROWS):  # in slices: no full-size float64 copy
            digest.update(np.round(self.object_box[start : start + _DIGEST_ROWS].astype(np.float64), 2))


class _TableBuilder:
    """Collects an ``InstanceTable``'s rows, turning them into arrays every ``CHUNK`` images (Python rows cost
    ~10x their arrays)."""

    CHUNK = 8192

    def __init__(self) -> None:
        self.paths: dict[str, int] = {}
        self.concepts: dict[str, int] = {}
        self.images = 0
        self.merged: set[tuple] = set()
        self._image_rows: list[tuple[int, int, int, bool]] = []
        self._object_rows: list[tuple[int, int]] = []
        self._boxes: list[np.ndarray] = []
        self._image_parts: list[np.ndarray] = []
        self._object_parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, record: GroundedImage, names: Sequence[str] | None, merge: bool) -> None:
        image = self.images
        self.images += 1
        path = self.paths.setdefault(record.image_path, len(self.paths))
        offset, size = record.image_range if record.image_range is not None else (-1, -1)
        self._image_rows.append((path, offset, size, record.pseudo))
        for box, concept in enumerate(box_concepts(record, names)):
            if not concept:
                continue
            if merge:
                key = (record.image_path, record.image_range, tuple(np.round(record.boxes[box], 1).tolist()))
                if key in self.merged:
                    continue
                self.merged.add(key)
            self._object_rows.append((image, self.concepts.setdefault(concept, len(self.concepts))))
            self._boxes.append(np.asarray(record.boxes[box], dtype=np.float32))
        if len(self._image_rows) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._image_rows:
            self._image_parts.append(np.asarray(self._image_rows, dtype=np.int64).reshape(-1, 4))
        if self._object_rows:
            rows = np.asarray(self._object_rows, dtype=np.int64).reshape(-1, 2)
            self._object_parts.append((rows, np.stack(self._boxes).reshape(-1, 4)))
        self._image_rows, self._object_rows, self._boxes = [], [], []

    def table(self) -> InstanceTable:
        self._flush()
        images = np.concatenate(self._image_parts) if self._image_parts else np.zeros((0, 4), dtype=np.int64)
        objects = (
            np.concatenate([rows for rows, _ in self._object_parts])
            if self._object_parts
            else np.zeros((0, 2), dtype=np.int64)
        )
        boxes = (
            np.concatenate([boxes for _, boxes in self._object_parts])
            if self._object_parts
            else np.zeros((0, 4), dtype=np.float32)
        )
        index = np.int32 if max(len(self.paths), len(self.concepts), self.images) < 2**31 else np.int64
        return InstanceTable(
            paths=list(self.paths),
            concepts=list(self.concepts),
            image_path=images[:, 0].astype(index),
            image_range=np.ascontiguousarray(images[:, 1:3]),
            image_pseudo=images[:, 3].astype(bool),
            object_image=objects[:, 0].astype(index),
            object_box=boxes.astype(np.float32),
            object_concept=objects[:, 1].astype(index),
        )


@dataclass(frozen=True)
class PastePool:
    """Objects to paste into a source's images: each image gets pastes with probability ``rate``, from 1 to
    ``per_image`` of them, drawn by ``weights`` (``[O]`` float64; None: alike)."""

    instances: InstanceTable
    rate: float
    per_image: int = 1
    weights: np.ndarray | None = None
    _cumulative: np.ndarray = dataclasses.field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if not len(self.instances) or not 0 < self.rate <= 1 or self.per_image < 1:
            raise ValueError(
                f"a paste pool needs instances, a rate in (0, 1] and per_image >= 1 (got {len(self.instances)} "
                f"instances, rate {self.rate}, per_image {self.per_image})"
            )
        weights = (
            np.ones(len(self.instances)) if self.weights is None else np.asarray(self.weights, np.float64)
        )
        if len(weights) != len(self.instances) or weights.min() <= 0:
            raise ValueError(f"paste weights: one > 0 per instance ({len(self.instances)} instances)")
        # np.cumsum adds in order (as itertools.accumulate): the draws are those of a list of the weights.
        object.__setattr__(self, "_cumulative", np.cumsum(weights))

    @property
    def nbytes(self) -> int:
        """The bytes of the pool's arrays: its table's columns, weights and cumulative weights."""
        table = self.instances
        columns = [table.image_path, table.image_range, table.image_pseudo, table.object_image, table.object_box,
                   table.object_concept, self._cumulative]  # fmt: skip
        return sum(column.nbytes for column in columns) + (0 if self.weights is None else self.weights.nbytes)

    def draw(self, rng: random.Random) -> Instance:
        point = rng.random() * float(self._cumulative[-1])
        index = int(np.searchsorted(self._cumulative, point, side="right"))
        return self.instances[min(index, len(self.instances) - 1)]


def box_concepts(record: GroundedImage, names: Sequence[str] | None = None) -> list[str]:
    """Per box of ``record`` its concept: of its phrase (grounding records) or of its category name
    (detection records, ``names`` their vocabulary; "" without it); "" when nothing names it."""
    if record.labels is not None:
        return [concept_of(names[label]) if names is not None else "" for label in record.labels]
    return [concept_of(_phrase_text(record.caption or "", spans)) for spans in record.box_spans or ()]


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
        x0, y0, x1, y1 = instance.box
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
        pastes.append(Paste(instance.image_path, instance.image_range, instance.box, instance.concept, x, y))
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
    pseudo: Iterable[GroundedImage],
    rate: float,
    per_image: int = 1,
    reference: Sequence[tuple[Sequence[GroundedImage], Sequence[str] | None]] = (),
    threshold: float | None = None,
    min_images: int = 2,
    human: Sequence[tuple[Sequence[GroundedImage], Sequence[str] | None]] = (),
) -> PastePool | None:
    """The boxes of the ``human`` sources (``(records, names)`` pairs), then the kept boxes of the ``pseudo``
    records, as a paste pool (None: no box at all), each weighted by the LVIS repeat factor of its concept
    against ``reference`` with ``threshold`` (None: alike). ``pseudo`` is read once, record by record (e.g.
    ``student.pseudo.iter_pseudo_labels``: the pool never holds a crawl's records). A pseudo-labelled concept
    boxed in fewer than ``min_images`` images weighs 1, as in ``student.data.repeat_factors`` (a typo is not a
    gap); a human one is trusted. The same box of one image in two human sources (a detection and a grounding
    file of the same images) is one instance."""
    table = InstanceTable.of([*((records, names, True) for records, names in human), (pseudo, None, False)])
    if not len(table):
        return None
    weights = None
    if threshold is not None:
        factor = concept_repeat_factor(reference, threshold)
        concept, found = table.object_concept, table.object_pseudo
        trusted = np.zeros(len(table.concepts), dtype=bool)
        trusted[concept[~found]] = True
        boxed = table.concept_images(pseudo=True) >= min_images
        weighed = trusted | boxed  # the concepts whose factor some object takes
        factors = np.ones(len(table.concepts))
        factors[weighed] = [factor(table.concepts[c]) for c in np.flatnonzero(weighed)]
        weights = np.where(found & ~boxed[concept], 1.0, factors[concept])
    return PastePool(table, rate, per_image, weights)
