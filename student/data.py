"""Training data for GLIP: COCO detection and MDETR-style grounding, turned into grounded prompts and batches.

Every source becomes a list of ``GroundedImage`` records (boxes in continuous xyxy original pixels). A record
becomes a training example per step: a detection image gets the official prompt of shuffled positive names plus
sampled negatives (``glip.prompts.sample_detection_prompt``); a grounding image keeps its caption and the spans
of its phrases. Examples are a pure function of (seed, step, position in batch), so a resumed run sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch import Tensor

from glip.preprocess import ImagePreprocessor, pad_to_batch
from glip.prompts import (
    Prompt,
    TokenizedPrompts,
    positive_map,
    sample_detection_prompt,
    tokenize_prompts,
    with_negative_phrases,
)
from pipeline.images import read_rgb
from pipeline.storage import filesystem_of
from pipeline.tars import MemberRange, read_member

logger = logging.getLogger(__name__)

Span = tuple[int, int]
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)
WORD = re.compile(r"[^\W_]+")  # a word of a name or phrase (letters and digits)


@dataclass(frozen=True)
class Paste:
    """An object pasted into a record's image (``student.paste``): the box ``box`` (continuous xyxy original
    pixels) of the image at ``image_path`` (``image_range``: its bytes inside a tar shard, as in
    ``GroundedImage``), named ``concept``, cut out and pasted with its top-left corner at ``(x, y)`` (original
    pixels of the receiving image). A value: it names its source image, it does not hold its record."""

    image_path: str
    image_range: tuple[int, int] | None
    box: tuple[float, float, float, float]
    concept: str
    x: int
    y: int


@dataclass(frozen=True)
class GroundedImage:
    """One annotated image.

    Attributes:
        image_path: file to read (any format PIL opens).
        width, height: original size in pixels.
        boxes: ``[N, 4]`` float32 continuous xyxy in original pixels.
        labels: detection data: per box an index into the vocabulary; None for grounding data.
        caption: grounding data: the caption; None for detection data.
        box_spans: grounding data: per box the character spans of its phrase in ``caption``.
        image_id: id in the source json (for evaluation).
        image_range: ``(offset, size)`` of the image's bytes inside ``image_path`` when that is a tar shard
            (pseudo-labelled images are read out of their shards, ``student.pseudo``); None for an image file.
        pseudo: the boxes are a teacher's pseudo-labels (``student.pseudo``), not human annotations.
        ignore_boxes: ``[M, 4]`` float32 continuous xyxy in original pixels: objects that may be there (the
            teacher's candidates scoring below the keep-threshold); training leaves the anchors they would
            claim out of the token loss. None: no ignore band.
        ignore_spans: per ignore box the character spans of its phrase in ``caption`` (like ``box_spans``).
            The loss leaves an ignored anchor out at every token, so it does not read them; they say what
            each candidate was.
        unlabelled_spans: per caption phrase that got no box, its character spans: its tokens are left out
            of the token loss (unknown, not negative). None: every token of the caption counts.
        pastes: objects pasted into the image (``student.paste``), in order; their boxes are the last
            ``len(pastes)`` of ``boxes``. They are pseudo-labels: without ``pseudo_box_loss`` they train the
            token loss only.
    """

    image_path: str
    width: int
    height: int
    boxes: np.ndarray
    labels: tuple[int, ...] | None = None
    caption: str | None = None
    box_spans: tuple[tuple[Span, ...], ...] | None = None
    image_id: int = 0
    image_range: tuple[int, int] | None = None
    pseudo: bool = False
    ignore_boxes: np.ndarray | None = None
    ignore_spans: tuple[tuple[Span, ...], ...] | None = None
    unlabelled_spans: tuple[tuple[Span, ...], ...] | None = None
    pastes: tuple[Paste, ...] = ()


def _coco_boxes(annotations: Sequence[dict]) -> np.ndarray:
    boxes = [
        [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
        for a in annotations
    ]
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _group_annotations(data: dict) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for annotation in data.get("annotations", []):
        if annotation.get("iscrowd", 0):
            continue
        grouped.setdefault(annotation["image_id"], []).append(annotation)
    return grouped


def load_coco_detection(
    json_path: str | Path, image_root: str | Path | None = None
) -> tuple[list[GroundedImage], list[str]]:
    """COCO detection json -> (records, category names in contiguous order).

    Category ids are mapped to contiguous indices 0..C-1 by sorted id, as the official contiguous mapping.
    """
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    root = Path(image_root) if image_root is not None else json_path.parent
    categories = sorted(data["categories"], key=lambda c: c["id"])
    contiguous = {c["id"]: index for index, c in enumerate(categories)}
    grouped = _group_annotations(data)
    records = []
    for image in sorted(data["images"], key=lambda i: i["id"]):
        annotations = grouped.get(image["id"], [])
        records.append(
            GroundedImage(
                image_path=str(root / image["file_name"]),
                width=int(image["width"]),
                height=int(image["height"]),
                boxes=_coco_boxes(annotations),
                labels=tuple(contiguous[a["category_id"]] for a in annotations),
                image_id=int(image["id"]),
            )
        )
    return records, [c["name"] for c in categories]


def load_grounding(json_path: str | Path, image_root: str | Path | None = None) -> list[GroundedImage]:
    """MDETR-style grounding json (one ``images[]`` entry per image+caption, ``tokens_positive`` per box)."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    root = Path(image_root) if image_root is not None else json_path.parent
    grouped = _group_annotations(data)
    records = []
    for image in sorted(data["images"], key=lambda i: i["id"]):
        annotations = grouped.get(image["id"], [])
        records.append(
            GroundedImage(
                image_path=str(root / image["file_name"]),
                width=int(image["width"]),
                height=int(image["height"]),
                boxes=_coco_boxes(annotations),
                caption=image["caption"],
                box_spans=tuple(
                    tuple((int(s), int(e)) for s, e in a["tokens_positive"]) for a in annotations
                ),
                image_id=int(image["id"]),
            )
        )
    return records


@dataclass(frozen=True)
class Example:
    """A record with its prompt for one step: per box, the index of its phrase in ``prompt``."""

    record: GroundedImage
    prompt: Prompt
    box_phrase: np.ndarray  # [N] int64, -1 = box dropped (its phrase did not fit in the prompt)


def make_example(
    record: GroundedImage,
    names: Sequence[str] | None,
    tokenizer,
    rng: random.Random,
    max_negatives: int = 85,
    max_tokens: int = 256,
    negatives: Sequence[str] | None = None,
) -> Example:
    """The prompt of ``record`` for this step (detection: sampled names; grounding: the caption, and when
    ``negatives`` is given, negative phrases drawn from it that name nothing the record's phrases name)."""
    if record.caption is not None:
        distinct: dict[tuple[Span, ...], int] = {}
        box_phrase = [distinct.setdefault(spans, len(distinct)) for spans in record.box_spans or ()]
        prompt = Prompt.from_caption(record.caption, list(distinct))
        if negatives:
            prompt = with_negative_phrases(prompt, screen_negatives(record, negatives), rng, max_negatives)
        return Example(record, prompt, np.asarray(box_phrase, dtype=np.int64))
    if names is None:
        raise ValueError(f"{record.image_path}: a detection record needs the category names")
    positives = [names[label] for label in record.labels or ()]
    sample = sample_detection_prompt(positives, names, tokenizer, rng, max_negatives, max_tokens)
    position = {category: phrase for phrase, category in enumerate(sample.prompt.phrase_ids)}
    box_phrase = [position.get(label, -1) for label in record.labels or ()]
    return Example(record, sample.prompt, np.asarray(box_phrase, dtype=np.int64))


# Words that open a noun phrase without naming anything: articles, quantifiers, counts.
_PHRASE_OPENERS = frozenset(
    "a an the this that these those some several many few one two three four five six seven eight nine ten".split()
)


def concept_of(phrase: str) -> str:
    """A phrase as a concept: lower-cased words without the articles, quantifiers and counts that open it,
    the last word singular ("Two big blue crosses" -> "big blue cross"); "" when nothing is left."""
    words = WORD.findall(phrase.lower())
    while words and (words[0] in _PHRASE_OPENERS or words[0].isdigit()):
        words = words[1:]
    if words:
        words[-1] = _singular(words[-1])
    return " ".join(words)


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def concept_dictionary(records: Sequence[GroundedImage], min_images: int = 2) -> list[str]:
    """The concepts (``concept_of``) of the phrases that have a box in at least ``min_images`` of the grounding
    ``records``, sorted: the pool that ``make_example`` draws caption negatives from. Counting images drops
    one-off spellings; counting only boxed phrases drops what a teacher never found ("the window")."""
    images: dict[str, int] = {}
    for record in records:
        if record.caption is None:
            continue
        found = {concept_of(_phrase_text(record.caption, spans)) for spans in record.box_spans or ()}
        for concept in found - {""}:
            images[concept] = images.get(concept, 0) + 1
    return sorted(concept for concept, count in images.items() if count >= min_images)


def screen_negatives(record: GroundedImage, pool: Sequence[str]) -> list[str]:
    """The concepts of ``pool`` that may serve as negatives of ``record``: none whose words are a subset or a
    superset of the words of one of its phrases (kept, ignored or unlabelled), which could name the same
    object ("big yellow hexagon" for "a yellow hexagon")."""
    phrases = (*(record.box_spans or ()), *(record.ignore_spans or ()), *(record.unlabelled_spans or ()))
    own = {frozenset(concept_of(_phrase_text(record.caption or "", spans)).split()) for spans in phrases}
    own.discard(frozenset())
    screened = []
    for concept in pool:
        words = frozenset(concept.split())
        if not any(words <= named or named <= words for named in own):
            screened.append(concept)
    return screened


def record_concepts(record: GroundedImage, names: Sequence[str] | None = None) -> set[str]:
    """The concepts (``concept_of``) a record has boxes of: its category names (detection, ``names`` its
    vocabulary), or its boxed phrases (grounding)."""
    if record.labels is not None:
        found = {concept_of(names[label]) for label in record.labels} if names is not None else set()
    else:
        found = {concept_of(_phrase_text(record.caption or "", spans)) for spans in record.box_spans or ()}
    return found - {""}


def concept_repeat_factor(
    reference: Sequence[tuple[Sequence[GroundedImage], Sequence[str] | None]], threshold: float
) -> Callable[[str], float]:
    """A concept's LVIS repeat factor ``max(1, sqrt(threshold / f(c)))``, ``f(c)`` the fraction of
    ``reference`` records (``(records, names)`` pairs) with a concept whose words are a subset of ``c``'s (at
    least one record); see ``repeat_factors``.

    The reference is indexed once (``_SubsetCounter``): a concept costs a few dictionary look-ups, not a pass
    over the reference, so a crawl's million concepts can be weighed against a million human images."""
    if threshold <= 0:
        raise ValueError(f"the repeat threshold must be > 0, got {threshold}")
    counter = _SubsetCounter(
        [frozenset(concept.split()) for concept in record_concepts(record, names)]
        for source, names in reference
        for record in source
    )
    if not counter.records:
        raise ValueError("repeat factors need reference records")
    frequency: dict[str, float] = {}

    def factor(concept: str) -> float:
        if concept not in frequency:
            frequency[concept] = max(counter.count(frozenset(concept.split())), 1) / counter.records
        return max(1.0, (threshold / frequency[concept]) ** 0.5)

    return factor


class _SubsetCounter:
    """How many records hold a word set that is a subset of a given one, each record a collection of word
    sets. Every distinct word set is filed under its rarest word (the fewest word sets have it), so a query
    scans only the sets filed under its own words, and few sets are filed under a common word; the records of
    each set are kept, and the union of those of a query's subsets is counted (cached per distinct union)."""

    def __init__(self, records: Iterable[Sequence[frozenset[str]]]) -> None:
        holders: dict[frozenset[str], list[int]] = {}
        self.records = 0
        for index, sets in enumerate(records):
            self.records = index + 1
            for words in set(sets):
                holders.setdefault(words, []).append(index)
        uses: dict[str, int] = {}
        for words in holders:
            for word in words:
                uses[word] = uses.get(word, 0) + 1
        self._filed: dict[str, list[frozenset[str]]] = {}
        for words in holders:
            rarest = min(words, key=lambda word: (uses[word], word))
            self._filed.setdefault(rarest, []).append(words)
        self._holders = {words: np.asarray(indices, dtype=np.int64) for words, indices in holders.items()}
        self._unions: dict[frozenset[frozenset[str]], int] = {}
        self._marks = np.zeros(self.records, dtype=bool)  # scratch: the records of a union, marked

    def count(self, words: frozenset[str]) -> int:
        subsets = frozenset(own for word in words for own in self._filed.get(word, ()) if own <= words)
        if len(subsets) <= 1:
            return len(self._holders[next(iter(subsets))]) if subsets else 0
        if subsets not in self._unions:
            for own in subsets:
                self._marks[self._holders[own]] = True
            self._unions[subsets] = int(np.count_nonzero(self._marks))
            for own in subsets:
                self._marks[self._holders[own]] = False
        return self._unions[subsets]


def repeat_factors(
    records: Sequence[GroundedImage], reference: Sequence[tuple[Sequence[GroundedImage], Sequence[str] | None]],
    threshold: float, names: Sequence[str] | None = None, min_images: int = 2,
) -> list[float]:  # fmt: skip
    """LVIS's repeat factors (Gupta et al. 2019) of ``records``, with concept frequencies read off
    ``reference`` (``(records, names)`` pairs, e.g. the human-annotated set; ``names``: the vocabulary of
    ``records`` when they are detection records): a record's factor is the largest
    ``max(1, sqrt(threshold / f(c)))`` over its concepts ``c``, where ``f(c)`` is the fraction of reference
    records that have a concept whose words are a subset of ``c``'s ("blue cross" counts for "big blue cross";
    at least one record, so a concept the reference never shows gets the largest factor). Concepts boxed in
    fewer than ``min_images`` of ``records`` count 1 (as in ``concept_dictionary``: a one-off spelling such as
    "green squae" is noise, not a gap to fill). Pseudo-labelled crawl images weighted this way fill the gaps of
    the human set: an image of a name the human set shows twice is drawn far more often than one of a name it
    shows in every tenth image."""
    factor = concept_repeat_factor(reference, threshold)
    concepts = [record_concepts(record, names) for record in records]
    images: dict[str, int] = {}
    for found in concepts:
        for concept in found:
            images[concept] = images.get(concept, 0) + 1
    return [max((factor(c) for c in found if images[c] >= min_images), default=1.0) for found in concepts]


def _phrase_text(caption: str, spans: Sequence[Span]) -> str:
    return " ".join(caption[start:end] for start, end in spans)


@dataclass
class Batch:
    """Model inputs and targets of one step.

    Attributes:
        images: ``[B, 3, H, W]`` float32 normalised BGR, zero-padded.
        image_sizes: ``(h, w)`` per image after resizing.
        input_ids, attention_mask: ``[B, T]`` int64 (T = longest prompt in the batch, or 256 with pad_to_max).
        boxes: per image ``[G_i, 4]`` float32 continuous xyxy in model-input pixels.
        positive_maps: per image ``[G_i, T]`` float32 binary token targets of each box.
        phrase_tokens: per image, the token indices of each phrase of its prompt.
        examples: the examples the batch was made of.
        labels: per image ``[G_i]`` int64 category index of each box (detection data), -1 for grounding boxes.
        class_targets: per image ``[G_i, K]`` class targets, or None (set by the trainer).
        box_loss_masks: per image ``[G_i]`` bool, False for boxes that train the token loss only, or None
            (all boxes train all losses); None when no image of the batch has such boxes.
        ignore_boxes: per image ``[M_i, 4]`` float32 continuous xyxy in model-input pixels, or None; None when
            no image of the batch has ignore boxes.
        token_loss_masks: per image ``[T]`` bool, False for tokens left out of its token loss, or None (all
            count); None when no image of the batch masks a token.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    input_ids: Tensor
    attention_mask: Tensor
    boxes: list[Tensor]
    positive_maps: list[Tensor]
    phrase_tokens: list[list[list[int]]]
    examples: list[Example]
    labels: list[Tensor]
    class_targets: list[Tensor | None] | None = None
    box_loss_masks: list[Tensor | None] | None = None
    ignore_boxes: list[Tensor | None] | None = None
    token_loss_masks: list[Tensor | None] | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            images=self.images.to(device, non_blocking=True),
            image_sizes=self.image_sizes,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            boxes=[b.to(device) for b in self.boxes],
            positive_maps=[m.to(device) for m in self.positive_maps],
            phrase_tokens=self.phrase_tokens,
            examples=self.examples,
            labels=[labels.to(device) for labels in self.labels],
            class_targets=_optional_to(self.class_targets, device),
            box_loss_masks=_optional_to(self.box_loss_masks, device),
            ignore_boxes=_optional_to(self.ignore_boxes, device),
            token_loss_masks=_optional_to(self.token_loss_masks, device),
        )


def _optional_to(
    tensors: list[Tensor | None] | None, device: torch.device | str
) -> list[Tensor | None] | None:
    return None if tensors is None else [None if t is None else t.to(device) for t in tensors]


def _none_if_all_none(values: list[Tensor | None]) -> list[Tensor | None] | None:
    return None if all(value is None for value in values) else values


def read_image(path: str) -> Image.Image:
    """An image file, RGB. Raises ``pipeline.images.ImageTooLarge`` (its header claims more than
    ``MAX_IMAGE_PIXELS``, nothing decoded) or ``ValueError`` (it does not decode), naming the file."""
    return read_rgb(path)


def record_image(record: GroundedImage) -> Image.Image:
    """The record's image, RGB: its file, or its byte range inside a tar shard (any fsspec URL); errors as
    ``read_image``."""
    return read_image_at(record.image_path, record.image_range)


def read_image_at(image_path: str, image_range: tuple[int, int] | None) -> Image.Image:
    """An image, RGB: the file ``image_path``, or the bytes ``image_range`` (offset, size) of the tar shard
    ``image_path`` (any fsspec URL); errors as ``read_image``."""
    if image_range is None:
        return read_image(image_path)
    fs, path = filesystem_of(image_path)  # a record of an object-store root: that root's remembered options
    data = read_member(fs, path, MemberRange(*image_range))
    return read_rgb(data, name=f"{image_path} at {tuple(image_range)}")


def apply_pastes(image: Image.Image, pastes: Sequence[Paste], feather: int = 2) -> Image.Image:
    """``image`` with each paste's box cut out of its source image and pasted at its place, the crop's border
    blended over ``feather`` pixels (no seam of hard edges for the detector to key on)."""
    if not pastes:
        return image
    image = image.copy()
    for paste in pastes:
        x0, y0, x1, y1 = paste.box
        left, top = int(np.floor(x0)), int(np.floor(y0))
        crop = read_image_at(paste.image_path, paste.image_range).crop(
            (left, top, left + int(np.ceil(x1 - x0)), top + int(np.ceil(y1 - y0)))
        )
        mask = Image.new("L", crop.size, 0)
        inset = min(feather, (min(crop.size) - 1) // 2)
        ImageDraw.Draw(mask).rectangle(
            (inset, inset, crop.size[0] - 1 - inset, crop.size[1] - 1 - inset), 255
        )
        if inset:
            mask = mask.filter(ImageFilter.GaussianBlur(inset / 2))
        image.paste(crop, (paste.x, paste.y), mask)
    return image


class BatchBuilder:
    """Turns examples into a ``Batch``: augmentation, resize, normalise, pad, tokenize, positive maps.

    Augmentation (training only): a random shorter side from ``train_min_sizes`` and a horizontal flip with
    probability 0.5 unless the caption says "left" or "right" (a flip would make it wrong). No colour jitter:
    colour words are part of the phrases.

    Pseudo-label options: with ``pseudo_box_loss`` False, the boxes of pseudo records train the token loss
    only (``Batch.box_loss_masks``). A record's ``ignore_boxes`` go through the same flip and resize as its
    boxes (``Batch.ignore_boxes``), and the tokens of its ``unlabelled_spans`` that no kept box's phrase covers
    are masked out of its token loss (``Batch.token_loss_masks``).
    """

    def __init__(
        self,
        tokenizer,
        min_size: int,
        max_size: int,
        train_min_sizes: Sequence[int] = (),
        size_divisibility: int = 32,
        max_query_len: int = 256,
        pad_to_max: bool = False,
        train: bool = True,
        pixel_mean=None,
        pixel_std=None,
        pseudo_box_loss: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.train = train
        self.pseudo_box_loss = pseudo_box_loss
        self.max_query_len = max_query_len
        self.pad_to_max = pad_to_max
        self.size_divisibility = size_divisibility
        stats = {} if pixel_mean is None else {"pixel_mean": pixel_mean, "pixel_std": pixel_std}
        sizes = sorted(set(train_min_sizes)) if train and train_min_sizes else [min_size]
        self.preprocessors = {s: ImagePreprocessor(s, max_size, size_divisibility, **stats) for s in sizes}

    def __call__(self, examples: Sequence[Example], rng: random.Random) -> Batch:
        tokenized = tokenize_prompts(
            self.tokenizer, [e.prompt for e in examples], self.max_query_len, self.pad_to_max
        )
        pixels, sizes, boxes, maps, labels = [], [], [], [], []
        box_loss_masks, ignore_boxes, token_loss_masks = [], [], []
        for index, example in enumerate(examples):
            image, image_boxes, image_ignore_boxes = self._augment(example, rng)
            preprocessor = self.preprocessors[rng.choice(sorted(self.preprocessors))]
            tensor, (scale_y, scale_x) = preprocessor.preprocess(image)
            pixels.append(tensor)
            sizes.append((int(tensor.shape[-2]), int(tensor.shape[-1])))
            phrase_map = positive_map(tokenized, index)
            keep = (example.box_phrase >= 0) & self._mapped(phrase_map, example.box_phrase)
            scale = torch.tensor([scale_x, scale_y, scale_x, scale_y])
            scaled = torch.from_numpy(image_boxes[keep]) * scale
            boxes.append(scaled.float())
            maps.append(phrase_map[torch.from_numpy(example.box_phrase[keep])])
            record_labels = example.record.labels
            box_labels = np.asarray(record_labels if record_labels is not None else [-1] * len(keep))
            labels.append(torch.from_numpy(box_labels.astype(np.int64).reshape(-1)[keep]))
            box_loss_masks.append(self._box_loss_mask(example.record, keep))
            ignore_boxes.append(
                None if image_ignore_boxes is None else (torch.from_numpy(image_ignore_boxes) * scale).float()
            )
            token_loss_masks.append(_token_loss_mask(example.record, tokenized, index, maps[-1]))
        return Batch(
            images=pad_to_batch(pixels, self.size_divisibility),
            image_sizes=sizes,
            input_ids=tokenized.input_ids,
            attention_mask=tokenized.attention_mask,
            boxes=boxes,
            positive_maps=maps,
            phrase_tokens=[[list(row) for row in p.token_indices or ()] for p in tokenized.prompts],
            examples=list(examples),
            labels=labels,
            box_loss_masks=_none_if_all_none(box_loss_masks),
            ignore_boxes=_none_if_all_none(ignore_boxes),
            token_loss_masks=_none_if_all_none(token_loss_masks),
        )

    def _box_loss_mask(self, record: GroundedImage, keep: np.ndarray) -> Tensor | None:
        """``[G]`` bool over the kept boxes, False for the pseudo-labelled ones (the record's, or pasted) when
        pseudo boxes train the token loss only; None: every box trains every loss."""
        if self.pseudo_box_loss or not (record.pseudo or record.pastes):
            return None
        mask = np.full(len(keep), not record.pseudo)
        mask[len(keep) - len(record.pastes) :] = False
        return torch.from_numpy(mask[keep])

    @staticmethod
    def _mapped(phrase_map: Tensor, box_phrase: np.ndarray) -> np.ndarray:
        """Boxes whose phrase covers at least one token (truncated phrases are dropped with their boxes)."""
        covered = (phrase_map.sum(dim=1) > 0).numpy()
        return np.array([phrase >= 0 and bool(covered[phrase]) for phrase in box_phrase], dtype=bool)

    def _augment(
        self, example: Example, rng: random.Random
    ) -> tuple[Image.Image, np.ndarray, np.ndarray | None]:
        """The image, its boxes and its ignore boxes (or None), flipped together (original pixels)."""
        record = example.record
        image = record_image(record)
        if image.size != (record.width, record.height):
            raise ValueError(
                f"{record.image_path}: size {image.size} differs from the annotation "
                f"({record.width}, {record.height})"
            )
        image = apply_pastes(image, record.pastes)
        boxes = record.boxes.copy()
        ignore_boxes = None
        if record.ignore_boxes is not None:
            ignore_boxes = np.asarray(record.ignore_boxes, dtype=np.float32).reshape(-1, 4).copy()
        if self.train and rng.random() < 0.5 and not _LEFT_RIGHT.search(example.prompt.caption):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes[:, [0, 2]] = record.width - boxes[:, [2, 0]]
            if ignore_boxes is not None:
                ignore_boxes[:, [0, 2]] = record.width - ignore_boxes[:, [2, 0]]
        return image, boxes, ignore_boxes


def _token_loss_mask(
    record: GroundedImage, tokenized: TokenizedPrompts, index: int, box_maps: Tensor
) -> Tensor | None:
    """``[T]`` bool, False for the tokens of ``record.unlabelled_spans`` that no kept box's phrase covers
    (``box_maps``: ``[G, T]``); None when the record has no unlabelled phrase.

    A token belongs to a span when their character ranges overlap (special tokens and padding cover none).
    """
    if not record.unlabelled_spans:
        return None
    offsets = tokenized.offsets[index]  # [T, 2] char range of each token, (0, 0) for special / padding
    unlabelled = torch.zeros(offsets.shape[0], dtype=torch.bool)
    for start, end in (span for phrase in record.unlabelled_spans for span in phrase):
        unlabelled |= (offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])
    return ~(unlabelled & ~(box_maps != 0).any(dim=0))
