"""Captions for the demo world: clean descriptions for the human-annotated sets, web alt-text for the crawl.

A caption is built from segments; a segment that names a group of objects becomes a ``Mention`` whose span
``[start, end)`` covers the group's attribute, colour and shape words ("big red circle", "blue squares"),
not its count or article, so that the span text always contains the shape name unless a typo hit it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

CLEAN_TEMPLATES = ("{}", "{}.", "a picture of {}", "an image with {}", "a drawing of {}.")

SEO_PREFIXES = (
    "Stock photo of ",
    "Free HD wallpaper: ",
    "Download ",
    "Picture of ",
    "Close-up of ",
    "Vector illustration of ",
    "shutterstock_{n} ",
    "IMG_{n}.jpg ",
)
SEO_SUFFIXES = (
    ", free HD wallpaper",
    " - stock photo",
    " | shutterstock",
    " - download now",
    " #shapes #art",
    " (IMG_{n}.jpg)",
    " royalty free image",
)
# Phrases that name no object of the world; some contain nouns ("day", "window") a noun-chunker will find.
FILLERS = (
    "on a sunny day",
    "my favourite picture",
    "best wallpaper ever",
    "view from the window",
    "abstract art for kids",
    "a nice day at the beach",
    "geometry lesson",
    "untitled",
)
FILLER_ONLY = ("my favourite picture", "untitled", "IMG_{n}.jpg", "DSC_{n}", "wallpaper", "abstract art")
NON_ENGLISH = (
    "Formes géométriques colorées sur fond texturé",
    "Bunte Formen auf einem Hintergrund",
    "Figuras de colores, foto de archivo",
    "カラフルな図形の写真",
    "Цветные фигуры на фоне",
    "Forme colorate, sfondo HD gratis",
)
EMPTY = ("", " ", "   ")


@dataclass(frozen=True)
class CrawlStyle:
    """Rates (probabilities per caption) of the crawl's caption kinds and noises."""

    empty: float = 0.02
    non_english: float = 0.03
    filler_only: float = 0.04
    partial: float = 0.3
    attribute: float = 0.35
    relation: float = 0.5
    vague_relation: float = 0.3  # "next to" whatever the geometry, as people write
    prefix: float = 0.45
    suffix: float = 0.45
    filler: float = 0.15
    typo: float = 0.08
    digits: float = 0.2
    vague_count: float = 0.25


@dataclass(frozen=True)
class Group:
    """Objects of one category in one image: box indices, centre (x, y) in pixels, true attributes."""

    colour: str
    shape: str
    boxes: tuple[int, ...]
    centre: tuple[float, float]
    attributes: tuple[str, ...] = ()

    @property
    def category(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Mention:
    """Span ``[start, end)`` of a caption that names the boxes ``boxes`` of category ``category``."""

    start: int
    end: int
    text: str
    category: str
    boxes: tuple[int, ...]


@dataclass(frozen=True)
class Caption:
    """A caption, the spans that name boxes, and how it was made (``kind``; ``typo`` if one was added)."""

    text: str
    mentions: tuple[Mention, ...]
    kind: str
    typo: bool = False


Segment = tuple[str, Group | None]


def plural(shape: str) -> str:
    """English plural of a shape name: "cross" -> "crosses", "circle" -> "circles"."""
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(group: Group, attribute: str | None) -> str:
    noun = group.shape if len(group.boxes) == 1 else plural(group.shape)
    words = [attribute] if attribute else []
    return " ".join([*words, group.colour, noun])


def _count_word(rng: np.random.Generator | None, count: int, head: str, style: CrawlStyle | None) -> str:
    """Determiner or count before a noun phrase starting with ``head``; plain English when ``rng`` is None."""
    if count == 1:
        return "one" if rng is not None and rng.random() < 0.1 else _article(head)
    if rng is not None and style is not None:
        if count >= 3 and rng.random() < style.vague_count:
            return str(rng.choice(["some", "several", "many"]))
        if rng.random() < style.digits:
            return str(count)
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)


def _group_segments(
    group: Group, rng: np.random.Generator | None = None, style: CrawlStyle | None = None
) -> list[Segment]:
    attribute = None
    if rng is not None and style is not None and group.attributes and rng.random() < style.attribute:
        attribute = str(rng.choice(group.attributes))
    phrase = _noun_phrase(group, attribute)
    return [(_count_word(rng, len(group.boxes), phrase, style) + " ", None), (phrase, group)]


def _list_segments(groups: list[Group], rng=None, style=None) -> list[Segment]:
    """ "a red circle, two blue squares and a green star" as segments."""
    segments: list[Segment] = []
    for index, group in enumerate(groups):
        if index > 0:
            segments.append((" and " if index == len(groups) - 1 else ", ", None))
        segments.extend(_group_segments(group, rng, style))
    return segments


def join_segments(segments: list[Segment], kind: str, typo: bool = False) -> Caption:
    """Concatenate segments; every segment that carries a group becomes a mention of its boxes."""
    text, mentions = "", []
    for piece, group in segments:
        if group is not None:
            mentions.append(Mention(len(text), len(text) + len(piece), piece, group.category, group.boxes))
        text += piece
    return Caption(text, tuple(mentions), kind, typo)


def clean_caption(rng: np.random.Generator, groups: list[Group]) -> Caption:
    """Plain description of every group, left to right: "a red circle and two blue squares"."""
    ordered = sorted(groups, key=lambda group: group.centre[0])
    template = CLEAN_TEMPLATES[int(rng.integers(len(CLEAN_TEMPLATES)))]
    head, tail = template.split("{}")
    return join_segments([(head, None), *_list_segments(ordered), (tail, None)], kind="clean")


def attribute_caption(rng: np.random.Generator, groups: list[Group]) -> Caption:
    """The objects named by one attribute only, as people also name them: by colour ("two red shapes and a
    blue shape") or by shape ("a circle and three squares"). A mention covers every object with that colour
    (or shape), whatever its other attribute, so these captions teach the colour and the shape words on
    their own, which the full names ("red circle") cannot untangle early in training."""
    by_colour = rng.random() < 0.5
    merged: dict[str, list[Group]] = {}
    for group in sorted(groups, key=lambda group: group.centre[0]):
        merged.setdefault(group.colour if by_colour else group.shape, []).append(group)
    template = CLEAN_TEMPLATES[int(rng.integers(len(CLEAN_TEMPLATES)))]
    head, tail = template.split("{}")
    text, mentions = head, []
    for index, (word, members) in enumerate(merged.items()):
        if index > 0:
            text += " and " if index == len(merged) - 1 else ", "
        boxes = tuple(sorted(box for group in members for box in group.boxes))
        if by_colour:
            phrase = f"{word} {'shape' if len(boxes) == 1 else 'shapes'}"
        else:
            phrase = word if len(boxes) == 1 else plural(word)
        text += _count_word(None, len(boxes), phrase, None) + " "
        mentions.append(Mention(len(text), len(text) + len(phrase), phrase, word, boxes))
        text += phrase
    return Caption(text + tail, tuple(mentions), kind="colour" if by_colour else "shape")


def relation(first: Group, second: Group) -> str:
    """Where ``first`` is relative to ``second``, from their centres (image y grows downwards)."""
    dx = second.centre[0] - first.centre[0]
    dy = second.centre[1] - first.centre[1]
    if abs(dx) > 1.5 * abs(dy):
        return "on the left of" if dx > 0 else "on the right of"
    if abs(dy) > 1.5 * abs(dx):
        return "above" if dy > 0 else "below"
    return "next to"


def _with_number(rng: np.random.Generator, text: str) -> str:
    return text.replace("{n}", str(int(rng.integers(1000, 10000))))


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return _with_number(rng, options[int(rng.integers(len(options)))])


def _body_segments(rng: np.random.Generator, groups: list[Group], style: CrawlStyle) -> list[Segment]:
    """The part naming objects: some or all groups, listed or related ("... next to ...")."""
    chosen = [groups[i] for i in rng.permutation(len(groups))]
    if len(chosen) > 1 and rng.random() < style.partial:
        chosen = chosen[: int(rng.integers(1, len(chosen)))]
    if len(chosen) < 2 or rng.random() >= style.relation:
        return _list_segments(chosen, rng, style)
    word = "next to" if rng.random() < style.vague_relation else relation(chosen[0], chosen[1])
    segments = [
        *_group_segments(chosen[0], rng, style),
        (f" {word} ", None),
        *_group_segments(chosen[1], rng, style),
    ]
    if len(chosen) > 2:
        segments += [(" with ", None), *_list_segments(chosen[2:], rng, style)]
    return segments


def _misspell(rng: np.random.Generator, word: str) -> str:
    """One keyboard slip inside a word of four or more letters: swap, drop or double a letter."""
    index = int(rng.integers(1, len(word) - 2))
    kind = int(rng.integers(3))
    if kind == 0:
        return word[:index] + word[index + 1] + word[index] + word[index + 2 :]
    if kind == 1:
        return word[:index] + word[index + 1 :]
    return word[:index] + word[index] + word[index:]


def _add_typo(rng: np.random.Generator, segments: list[Segment]) -> list[Segment]:
    """Misspell one random word (4+ letters) in one segment; spans follow because they come from segments."""
    words = [(i, start) for i, (text, _) in enumerate(segments) for start in _word_starts(text)]
    if not words:
        return segments
    index, start = words[int(rng.integers(len(words)))]
    text, group = segments[index]
    end = start
    while end < len(text) and text[end].isalpha():
        end += 1
    changed = text[:start] + _misspell(rng, text[start:end]) + text[end:]
    return [*segments[:index], (changed, group), *segments[index + 1 :]]


def _word_starts(text: str) -> list[int]:
    starts, index = [], 0
    for word in text.split(" "):
        if len(word) >= 4 and word.isalpha():
            starts.append(index)
        index += len(word) + 1
    return starts


def _object_caption(rng: np.random.Generator, groups: list[Group], style: CrawlStyle) -> Caption:
    segments: list[Segment] = []
    if rng.random() < style.prefix:
        segments.append((_pick(rng, SEO_PREFIXES), None))
    segments += _body_segments(rng, groups, style)
    if rng.random() < style.filler:
        segments.append((" " + _pick(rng, FILLERS), None))
    if rng.random() < style.suffix:
        segments.append((_pick(rng, SEO_SUFFIXES), None))
    first, group = segments[0]
    if group is None and rng.random() < 0.5:
        segments[0] = (first[:1].upper() + first[1:], None)
    typo = rng.random() < style.typo
    if typo:
        segments = _add_typo(rng, segments)
    return join_segments(segments, kind="objects", typo=typo)


def crawl_caption(rng: np.random.Generator, groups: list[Group], style: CrawlStyle = CrawlStyle()) -> Caption:
    """Web alt-text for an image whose objects form ``groups``.

    Kinds: "empty" (blank), "non_english", "filler" (names no object: "my favourite picture",
    "IMG_2031.jpg") and "objects" (some or all groups, with counts, attributes, relations, SEO noise, typos).
    """
    draw = rng.random()
    if draw < style.empty:
        return Caption(_pick(rng, EMPTY), (), "empty")
    draw -= style.empty
    if draw < style.non_english:
        return Caption(_pick(rng, NON_ENGLISH), (), "non_english")
    draw -= style.non_english
    if draw < style.filler_only or not groups:
        return Caption(_pick(rng, FILLER_ONLY), (), "filler")
    return _object_caption(rng, groups, style)
