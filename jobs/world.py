"""Generate the embedded demo world: coloured shapes, a human-annotated set, a caption crawl, an eval split.

    python -m jobs.world --out demo-out/world --seed 0              # long-tailed (the default)
    python -m jobs.world --out demo-out/world --seed 0 --uniform    # the uniform world of sessions 1-6

Everything is a function of the options and ``--seed``: the same command writes byte-identical files.
Layout under ``--out`` (paths relative to it are also listed in ``world.json``):

    images/train/*.jpg, images/eval/*.jpg          human-annotated and held-out images (disjoint)
    annotations/{train,eval}_coco.json             COCO detection (bbox xywh, categories "red circle", ...)
    annotations/{train,eval}_grounding.json        MDETR-style grounding: one images[] entry per caption,
                                                   annotations carry tokens_positive char spans
    annotations/verified_coco.json                 a verified sample of the crawl: COCO detection of served
                                                   crawl images (file_name in crawl_images/), each with uid, url
    crawl/part-NNNNN.parquet                       the crawl: columns url, caption (web alt-text)
    crawl_images/<name>.jpg                        what a server at --base-url serves as /img/<name>.jpg
    crawl_truth.json                               per crawl uid: true boxes (xyxy) and caption spans
    leaks.json                                     eval images that also sit in the crawl, and how altered
    world.json                                     manifest: options, counts, vocabulary, rare names, counts
                                                   per name, verified uids, file paths

The default world is long-tailed the way LVIS is (its gain from web data sits in the rare names): a fixed
quarter of the names (``rare_categories``: 9 of the default 36) appear in only 1-10 human-annotated train
images each, the others in dozens; the caption crawl (800 images, twice the human set) is drawn uniformly,
so it mentions every name about equally often; the held-out split (600 images, uniform) holds every name
dozens of times (standard errors, from 6 folds, with the teacher of session 6 on seed 0: AP 0.7 points, APr
over the 9 rare names 1.1). ``--uniform`` draws the train split uniformly too and, with the counts of that
time (600 train, 150 eval, 400 crawl images), writes the world of sessions 1-6 byte for byte (world.json
aside, which gained fields, and annotations/verified_coco.json).

A crawl sample's uid is the first 16 hex digits of sha256(url), as everywhere in the engine; dead URLs name
files that are not in crawl_images/.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs._world_scene import (
    COLOURS,
    DEFAULT_COLOURS,
    DEFAULT_SHAPES,
    MAX_ROTATION,
    Scene,
    SceneObject,
    render_scene,
    sample_scene,
)
from jobs._world_text import Caption, Group, attribute_caption, clean_caption, crawl_caption
from pipeline.schema import url_uid

logger = logging.getLogger(__name__)

# Independent random streams, so that changing one count never changes the images of another part.
TRAIN, EVAL, CRAWL, LEAK, DEAD, NAMES, ORDER, RARE, VERIFIED = range(1, 10)
# Image counts when WorldOptions leaves them unset: the long-tailed default keeps the demo fast (a crawl twice
# the human set, a held-out split large enough for AP to a point); the uniform world keeps its old counts.
LONG_TAIL_COUNTS = {"train_images": 400, "eval_images": 600, "crawl_images": 800}
UNIFORM_COUNTS = {"train_images": 600, "eval_images": 150, "crawl_images": 400}
RARE_PERIOD = 4  # colour i with shape j is a rare name when (i + j) % RARE_PERIOD == 0
LEAK_KINDS = ("identical", "reencoded", "resized")
OWN_ENTRIES = (
    "images",
    "annotations",
    "crawl",
    "crawl_images",
    "crawl_truth.json",
    "leaks.json",
    "world.json",
)
DATASET_NAME = "shapes"
Category = tuple[str, str]  # (colour, shape)


def rare_categories(colours: Sequence[str], shapes: Sequence[str]) -> list[Category]:
    """The rare (colour, shape) pairs, in category order: colour i with shape j when (i + j) % 4 == 0.

    Fixed by the vocabulary, never by the seed, so a teacher trained on one seed's world stays valid on every
    other seed's. These anti-diagonals of the colour x shape grid hold about a quarter of the names (9 of the
    default 36: red circle, red hexagon, green star, blue triangle, yellow square, yellow cross, purple
    circle, purple hexagon, orange star) and put every colour and every shape in some rare name and in some
    common one: a rare name's words are learned from common names, only their pairing is rare.
    """
    return [
        (colour, shape)
        for i, colour in enumerate(colours)
        for j, shape in enumerate(shapes)
        if (i + j) % RARE_PERIOD == 0
    ]


@dataclass(frozen=True)
class WorldOptions:
    """What world to generate. Ranges are inclusive ``(low, high)`` pairs in pixels or counts.

    ``colours`` entries are palette names or ``name=#rrggbb`` for a colour of one's own.

    ``long_tail`` (default): each rare name (``rare_categories``) is shown in ``rare_images`` human train
    images (a count per name drawn from the seed in that range; a train split too small for them all gives
    the rare names their images in turn) and nowhere else in the train split, whose other images draw only
    common names; the crawl and the held-out split draw every name uniformly. False: the train split is
    uniform too. ``train_images`` / ``eval_images`` / ``crawl_images`` left None take 400 / 600 / 800 in a
    long-tailed world and 600 / 150 / 400 (the old world's) in a uniform one. ``verified_images`` fresh crawl
    images (never a leak or a dead URL) form the verified sample, at most half the fresh crawl so that a
    small world keeps crawl images to train on.
    """

    out: str = "demo-out/world"
    seed: int = 0
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colours: tuple[str, ...] = DEFAULT_COLOURS
    long_tail: bool = True
    train_images: int | None = None
    eval_images: int | None = None
    crawl_images: int | None = None
    rare_images: tuple[int, int] = (1, 10)
    verified_images: int = 50
    leaks: int = 6
    dead_urls: int = 6
    crawl_partitions: int = 1
    image_size: tuple[int, int] = (160, 320)
    object_size: tuple[int, int] = (16, 120)
    objects_per_image: tuple[int, int] = (1, 5)
    # Per training image, a second grounding caption naming its objects by colour or by shape alone.
    attribute_captions: bool = False
    jpeg_quality: int = 90
    base_url: str = "http://127.0.0.1:8765"

    def __post_init__(self) -> None:
        # Options read back from world.json arrive with lists; store tuples so equal options compare equal.
        for field in ("shapes", "colours", "image_size", "object_size", "objects_per_image", "rare_images"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        defaults = LONG_TAIL_COUNTS if self.long_tail else UNIFORM_COUNTS
        for field, default in defaults.items():
            if getattr(self, field) is None:
                object.__setattr__(self, field, default)
        self._check_vocabulary()
        self._check_numbers()

    def _check_vocabulary(self) -> None:
        unknown = [shape for shape in self.shapes if shape not in MAX_ROTATION]
        if unknown or not self.shapes or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes {list(self.shapes)} must be distinct names from {sorted(MAX_ROTATION)}")
        names = list(self.palette())
        if not names or len(names) != len(self.colours):
            raise ValueError(f"colours {list(self.colours)} must be distinct")
        if self.long_tail and len(self.rare_categories()) == len(names) * len(self.shapes):
            raise ValueError(
                "a long-tailed world needs a common name: give more colours or shapes, or --uniform"
            )

    def _check_numbers(self) -> None:
        for field in ("image_size", "object_size", "objects_per_image"):
            low, high = getattr(self, field)
            if not 0 < low <= high:
                raise ValueError(f"{field} must satisfy 0 < low <= high, got {(low, high)}")
        if self.image_size[0] < 32 or self.object_size[0] > 0.6 * self.image_size[0]:
            raise ValueError("image_size low must be >= 32 and object_size low <= 60% of it")
        counts = (
            "seed",
            "train_images",
            "eval_images",
            "crawl_images",
            "verified_images",
            "leaks",
            "dead_urls",
        )
        if any(getattr(self, name) < 0 for name in counts) or self.crawl_partitions < 1:
            raise ValueError(f"{', '.join(counts)} must be >= 0 and crawl_partitions >= 1")
        if not 0 <= self.rare_images[0] <= self.rare_images[1]:
            raise ValueError(f"rare_images must satisfy 0 <= low <= high, got {self.rare_images}")
        if self.leaks > self.eval_images:
            raise ValueError(f"leaks ({self.leaks}) cannot exceed eval_images ({self.eval_images})")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError("jpeg_quality must be in [1, 95]")

    def palette(self) -> dict[str, tuple[int, int, int]]:
        """Colour name -> RGB, in option order."""
        return dict(_parse_colour(entry) for entry in self.colours)

    def rare_categories(self) -> list[Category]:
        """This vocabulary's rare (colour, shape) pairs (module ``rare_categories``), long-tailed or not."""
        return rare_categories(list(self.palette()), self.shapes)

    def verified_count(self) -> int:
        """Images in the verified sample: ``verified_images``, at most half the fresh crawl."""
        return min(self.verified_images, self.crawl_images // 2)


def _parse_colour(entry: str) -> tuple[str, tuple[int, int, int]]:
    name, _, code = entry.partition("=")
    if code:
        code = code.lstrip("#")
        if len(code) != 6 or any(c not in "0123456789abcdefABCDEF" for c in code):
            raise ValueError(f"colour {entry!r}: expected name=#rrggbb")
        return name, (int(code[0:2], 16), int(code[2:4], 16), int(code[4:6], 16))
    if name not in COLOURS:
        raise ValueError(f"unknown colour {name!r}; valid: {sorted(COLOURS)} or name=#rrggbb")
    return name, COLOURS[name]


@dataclass(frozen=True)
class _Image:
    """One generated image: file name, scene (boxes in the image's own pixels) and JPEG bytes."""

    name: str
    scene: Scene
    jpeg: bytes


def _stream(options: WorldOptions, stream: int, index: int = 0, part: int = 0) -> np.random.Generator:
    return np.random.default_rng((options.seed, stream, index, part))


def _encode(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _sample(
    options: WorldOptions,
    rng: np.random.Generator,
    categories: tuple[Category, ...] | None = None,
    first: Category | None = None,
) -> Scene:
    """A scene of the options' sizes; ``categories`` and ``first`` as ``sample_scene`` takes them."""
    size = tuple(int(rng.integers(options.image_size[0], options.image_size[1] + 1)) for _ in range(2))
    count = int(rng.integers(options.objects_per_image[0], options.objects_per_image[1] + 1))
    colours, shapes = tuple(options.palette()), options.shapes
    return sample_scene(
        rng, size, colours, shapes, options.object_size, count, categories=categories, first=first
    )


def _make_image(
    options: WorldOptions,
    stream: int,
    index: int,
    name: str,
    categories: tuple[Category, ...] | None = None,
    first: Category | None = None,
) -> _Image:
    rng = _stream(options, stream, index)
    scene = _sample(options, rng, categories, first)
    image = render_scene(rng, scene, options.palette())
    return _Image(name, scene, _encode(image, options.jpeg_quality))


def _rare_plan(options: WorldOptions) -> list[Category | None]:
    """Per train image of a long-tailed world, the rare category it must show (None: common names only).

    Rare name k gets n_k images, n_k uniform in ``rare_images``, at random places in the split. A split too
    small for all of them gives the rare names their images in turn (each its first, then each its second...).
    """
    rare = options.rare_categories()
    rng = _stream(options, RARE)
    low, high = options.rare_images
    wanted = rng.integers(low, high + 1, size=len(rare)).tolist()
    turns = [
        category for turn in range(max(wanted, default=0)) for category, n in zip(rare, wanted) if turn < n
    ]
    plan: list[Category | None] = [None] * options.train_images
    for position, category in zip(rng.permutation(options.train_images).tolist(), turns):
        plan[position] = category
    return plan


def _human_images(options: WorldOptions, split: str, stream: int, count: int) -> list[_Image]:
    """Render one human-annotated split; a long-tailed world's train split as ``_rare_plan`` says."""
    names = [f"{split}_{index:06d}.jpg" for index in range(count)]
    if split != "train" or not options.long_tail:
        return [_make_image(options, stream, index, name) for index, name in enumerate(names)]
    rare = set(options.rare_categories())
    colours = list(options.palette())
    common = tuple((c, s) for c in colours for s in options.shapes if (c, s) not in rare)
    plan = _rare_plan(options)
    return [_make_image(options, stream, i, name, common, plan[i]) for i, name in enumerate(names)]


def _groups(scene: Scene) -> list[Group]:
    """Objects of a scene grouped by category, with the attributes that are true of every member."""
    shorter = min(scene.width, scene.height)
    members: dict[str, list[int]] = {}
    for index, item in enumerate(scene.objects):
        members.setdefault(item.category, []).append(index)
    groups = []
    for indices in members.values():
        items = [scene.objects[i] for i in indices]
        sides = [max(o.box[2] - o.box[0], o.box[3] - o.box[1]) / shorter for o in items]
        candidates = {
            "big": all(side >= 0.35 for side in sides),
            "small": all(side <= 0.12 for side in sides),
            "bright": all(o.shade >= 1.08 for o in items),
            "dark": all(o.shade <= 0.88 for o in items),
        }
        centre = np.mean([[(o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2] for o in items], axis=0)
        attributes = tuple(word for word, true in candidates.items() if true)
        centre_xy = (float(centre[0]), float(centre[1]))
        groups.append(Group(items[0].colour, items[0].shape, tuple(indices), centre_xy, attributes))
    return groups


def _categories(options: WorldOptions) -> list[dict]:
    """COCO categories, ids 1..C, every colour with every shape: "red circle", "red square", ..."""
    pairs = [(colour, shape) for colour in options.palette() for shape in options.shapes]
    return [
        {"id": i, "name": f"{colour} {shape}", "supercategory": shape, "colour": colour, "shape": shape}
        for i, (colour, shape) in enumerate(pairs, start=1)
    ]


def _rounded_xyxy(box: tuple[float, ...]) -> list[float]:
    return [round(float(value), 3) for value in box]


def _annotation(annotation_id: int, image_id: int, item: SceneObject, category_ids: dict[str, int]) -> dict:
    """COCO annotation of one object: bbox xywh in pixels, area of its visible polygon."""
    x0, y0, x1, y1 = _rounded_xyxy(item.box)
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_ids[item.category],
        "bbox": [x0, y0, round(x1 - x0, 3), round(y1 - y0, 3)],
        "area": round(item.area, 3),
        "iscrowd": 0,
    }


def _image_entry(image_id: int, image: _Image) -> dict:
    return {"id": image_id, "file_name": image.name, "width": image.scene.width, "height": image.scene.height}


def _coco(images: list[_Image], categories: list[dict], split: str) -> dict:
    category_ids = {category["name"]: category["id"] for category in categories}
    entries, annotations = [], []
    for image_id, image in enumerate(images, start=1):
        entries.append(_image_entry(image_id, image))
        for item in image.scene.objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, item, category_ids))
    info = {"description": f"glip-engine demo world, {split} split", "box_format": "coco xywh"}
    return {"info": info, "images": entries, "annotations": annotations, "categories": categories}


def _grounding(
    images: list[_Image], captions: list[list[Caption]], categories: list[dict], split: str
) -> dict:
    """MDETR-style grounding json: one images[] entry per (image, caption), spans in tokens_positive."""
    category_ids = {category["name"]: category["id"] for category in categories}
    entries, annotations = [], []
    pairs = [
        (original, sentence, image, caption)
        for original, (image, image_captions) in enumerate(zip(images, captions), start=1)
        for sentence, caption in enumerate(image_captions)
    ]
    for image_id, (original, sentence, image, caption) in enumerate(pairs, start=1):
        entry = _image_entry(image_id, image)
        entry.update(caption=caption.text, dataset_name=DATASET_NAME, original_img_id=original)
        entry.update(sentence_id=sentence, tokens_negative=[])
        entries.append(entry)
        for mention in caption.mentions:
            for box_index in mention.boxes:
                item = image.scene.objects[box_index]
                annotation = _annotation(len(annotations) + 1, image_id, item, category_ids)
                annotation["tokens_positive"] = [[mention.start, mention.end]]
                annotations.append(annotation)
    info = {"description": f"glip-engine demo world, {split} split, grounding", "box_format": "coco xywh"}
    return {"info": info, "images": entries, "annotations": annotations, "categories": categories}


def _write_json(path: Path, payload: dict, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_human_split(options: WorldOptions, split: str, stream: int, count: int, out: Path) -> list[_Image]:
    """Render one human-annotated split and write its images and both annotation files."""
    images = _human_images(options, split, stream, count)
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        (folder / image.name).write_bytes(image.jpeg)
    captions = [
        [clean_caption(_stream(options, stream, index, part=1), _groups(image.scene))]
        for index, image in enumerate(images)
    ]
    if split == "train" and options.attribute_captions:
        for index, image in enumerate(images):
            captions[index].append(
                attribute_caption(_stream(options, stream, index, part=2), _groups(image.scene))
            )
    categories = _categories(options)
    _write_json(out / "annotations" / f"{split}_coco.json", _coco(images, categories, split))
    _write_json(
        out / "annotations" / f"{split}_grounding.json", _grounding(images, captions, categories, split)
    )
    logger.info(
        "world: %s split, %d images, %d boxes", split, count, sum(len(i.scene.objects) for i in images)
    )
    return images


@dataclass(frozen=True)
class _CrawlRow:
    """One crawl row: served file name, caption, the image behind it (None for a dead URL), leak facts."""

    name: str
    caption: Caption
    image: _Image | None
    leak: dict | None = None
    verified: bool = False


def _crawl_names(options: WorldOptions, count: int) -> list[str]:
    """Distinct random file names, like the opaque names of images on the web."""
    rng = _stream(options, NAMES)
    names: dict[str, None] = {}  # insertion-ordered set
    while len(names) < count:
        names[rng.bytes(6).hex() + ".jpg"] = None
    return list(names)


def _scaled(scene: Scene, width: int, height: int) -> Scene:
    """The scene of an image resized to ``width`` x ``height``: polygons, boxes and areas scaled."""
    factors = np.array([width / scene.width, height / scene.height])
    objects = tuple(
        dataclasses.replace(
            item,
            polygon=item.polygon * factors,
            box=tuple((np.array(item.box).reshape(2, 2) * factors).reshape(-1).tolist()),
            area=item.area * float(factors.prod()),
        )
        for item in scene.objects
    )
    return Scene(width, height, objects)


def _leaked_copy(
    options: WorldOptions, rng: np.random.Generator, source: _Image, kind: str
) -> tuple[bytes, Scene, dict]:
    """Crawl copy of an eval image: the same bytes, re-encoded at another quality, or resized."""
    if kind == "identical":
        return source.jpeg, source.scene, {"jpeg_quality": options.jpeg_quality, "scale": None}
    decoded = Image.open(io.BytesIO(source.jpeg)).convert("RGB")
    if kind == "reencoded":
        quality = int(rng.integers(55, 80))
        return _encode(decoded, quality), source.scene, {"jpeg_quality": quality, "scale": None}
    scale = float(rng.uniform(0.6, 0.9))
    width, height = round(decoded.width * scale), round(decoded.height * scale)
    resized = decoded.resize((width, height), Image.Resampling.LANCZOS)
    jpeg = _encode(resized, options.jpeg_quality)
    return jpeg, _scaled(source.scene, width, height), {"jpeg_quality": options.jpeg_quality, "scale": scale}


def _leak_rows(options: WorldOptions, eval_images: list[_Image], names: list[str]) -> list[_CrawlRow]:
    chosen = _stream(options, LEAK).choice(len(eval_images), size=options.leaks, replace=False)
    rows = []
    for number, (eval_index, name) in enumerate(zip(chosen.tolist(), names)):
        rng = _stream(options, LEAK, number + 1)
        kind = LEAK_KINDS[number % len(LEAK_KINDS)]
        source = eval_images[eval_index]
        jpeg, scene, facts = _leaked_copy(options, rng, source, kind)
        leak = {"kind": kind, "eval_file_name": source.name, "eval_image_id": eval_index + 1, **facts}
        caption = crawl_caption(rng, _groups(scene))
        rows.append(_CrawlRow(name, caption, _Image(name, scene, jpeg), leak))
    return rows


def _crawl_rows(options: WorldOptions, eval_images: list[_Image]) -> list[_CrawlRow]:
    """Fresh crawl images, leaked eval images and dead URLs, in a shuffled order."""
    total = options.crawl_images + options.leaks + options.dead_urls
    names = _crawl_names(options, total)
    chosen = _stream(options, VERIFIED).choice(options.crawl_images, options.verified_count(), replace=False)
    verified = set(chosen.tolist())
    rows = []
    for index in range(options.crawl_images):
        image = _make_image(options, CRAWL, index, names[index])
        caption = crawl_caption(_stream(options, CRAWL, index, part=1), _groups(image.scene))
        rows.append(_CrawlRow(image.name, caption, image, verified=index in verified))
    rows += _leak_rows(
        options, eval_images, names[options.crawl_images : options.crawl_images + options.leaks]
    )
    for index, name in enumerate(names[total - options.dead_urls :]):
        rng = _stream(options, DEAD, index)
        rows.append(_CrawlRow(name, crawl_caption(rng, _groups(_sample(options, rng))), None))
    order = _stream(options, ORDER).permutation(len(rows))
    return [rows[i] for i in order.tolist()]


def _truth_entry(row: _CrawlRow, url: str, category_ids: dict[str, int]) -> dict:
    """True boxes (xyxy pixels) of one crawl row and the caption spans that name them."""
    scene = row.image.scene if row.image is not None else None
    boxes = [] if scene is None else scene.objects
    mentions = [] if scene is None else row.caption.mentions
    return {
        "uid": url_uid(url),
        "url": url,
        "name": row.name,
        "caption": row.caption.text,
        "caption_kind": row.caption.kind,
        "typo": row.caption.typo,
        "dead": scene is None,
        "leak": row.leak,
        "width": None if scene is None else scene.width,
        "height": None if scene is None else scene.height,
        "boxes": [
            {"bbox": _rounded_xyxy(o.box), "category": o.category, "category_id": category_ids[o.category]}
            for o in boxes
        ],
        "mentions": [
            {"start": m.start, "end": m.end, "text": m.text, "category": m.category, "boxes": list(m.boxes)}
            for m in mentions
        ],
    }


def _url(options: WorldOptions, name: str) -> str:
    return f"{options.base_url.rstrip('/')}/img/{name}"


def _write_crawl(options: WorldOptions, rows: list[_CrawlRow], out: Path) -> dict[str, list[str]]:
    """Write served images, the parquet partitions, the truth and the leak list; returns written paths."""
    (out / "crawl_images").mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row.image is not None:
            (out / "crawl_images" / row.name).write_bytes(row.image.jpeg)
    urls = [_url(options, row.name) for row in rows]
    partitions = []
    for number, indices in enumerate(np.array_split(np.arange(len(rows)), options.crawl_partitions)):
        table = pa.table(
            {
                "url": pa.array([urls[i] for i in indices.tolist()], pa.string()),
                "caption": pa.array([rows[i].caption.text for i in indices.tolist()], pa.string()),
            }
        )
        partitions.append(f"crawl/part-{number:05d}.parquet")
        (out / "crawl").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / partitions[-1])
    category_ids = {category["name"]: category["id"] for category in _categories(options)}
    samples = {url_uid(url): _truth_entry(row, url, category_ids) for url, row in zip(urls, rows)}
    _write_json(
        out / "crawl_truth.json", {"base_url": options.base_url, "box_format": "xyxy", "samples": samples}
    )
    leaks = [
        {"uid": url_uid(url), "url": url, "name": row.name, **row.leak}
        for url, row in zip(urls, rows)
        if row.leak is not None
    ]
    _write_json(out / "leaks.json", {"leaks": leaks}, indent=1)
    _write_json(out / "annotations" / "verified_coco.json", _verified_coco(options, rows, urls))
    return {"crawl": partitions}


def _verified_coco(options: WorldOptions, rows: list[_CrawlRow], urls: list[str]) -> dict:
    """COCO detection json of the verified sample, in crawl order: every true box of each image, the image's
    ``file_name`` in crawl_images/ and its crawl ``uid``, ``url`` and ``caption``."""
    categories = _categories(options)
    category_ids = {category["name"]: category["id"] for category in categories}
    entries, annotations = [], []
    for row, url in zip(rows, urls):
        if not row.verified:
            continue
        entry = _image_entry(len(entries) + 1, row.image)
        entry.update(uid=url_uid(url), url=url, caption=row.caption.text)
        entries.append(entry)
        for item in row.image.scene.objects:
            annotations.append(_annotation(len(annotations) + 1, entry["id"], item, category_ids))
    info = {
        "description": "glip-engine demo world, verified sample of the crawl",
        "box_format": "coco xywh",
        "image_root": "crawl_images",
    }
    return {"info": info, "images": entries, "annotations": annotations, "categories": categories}


def _prepare(out: Path) -> None:
    """Make ``out`` ready: a previous world there is replaced; any other non-empty folder is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / "world.json").exists():
            raise FileExistsError(f"{out} is not empty and holds no world.json; refusing to write into it")
        for entry in OWN_ENTRIES:
            target = out / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _counts(
    options: WorldOptions, train: list[_Image], evaluation: list[_Image], rows: list[_CrawlRow]
) -> dict:
    kinds: dict[str, int] = {}
    for row in rows:
        kinds[row.caption.kind] = kinds.get(row.caption.kind, 0) + 1
    served = [row for row in rows if row.image is not None]
    partial = sum(
        1
        for row in served
        if row.caption.mentions
        and sum(len(m.boxes) for m in row.caption.mentions) < len(row.image.scene.objects)
    )
    return {
        "train_images": len(train),
        "train_boxes": sum(len(image.scene.objects) for image in train),
        "eval_images": len(evaluation),
        "eval_boxes": sum(len(image.scene.objects) for image in evaluation),
        "crawl_rows": len(rows),
        "crawl_images": len(served),
        "crawl_boxes": sum(len(row.image.scene.objects) for row in served),
        "dead_urls": len(rows) - len(served),
        "leaks": options.leaks,
        "caption_kinds": dict(sorted(kinds.items())),
        "typo_captions": sum(row.caption.typo for row in rows),
        "partial_captions": partial,
        "verified_images": sum(row.verified for row in rows),
    }


PER_NAME = (
    "train_images",
    "train_boxes",
    "eval_images",
    "eval_boxes",
    "crawl_images",
    "crawl_boxes",
    "crawl_mentions",
    "verified_images",
    "verified_boxes",
)


def _per_name(
    options: WorldOptions, train: list[_Image], evaluation: list[_Image], rows: list[_CrawlRow]
) -> dict[str, dict[str, int]]:
    """Name -> images and boxes showing it per split, and caption mentions of it in the crawl.

    ``crawl_*`` counts the fresh crawl images outside the verified sample (no leak, no dead URL): what a
    round can train on; ``verified_*`` the verified sample.
    """
    table = {category["name"]: dict.fromkeys(PER_NAME, 0) for category in _categories(options)}

    def add(images: list[_Image], split: str) -> None:
        for image in images:
            names = [item.category for item in image.scene.objects]
            for name in set(names):
                table[name][f"{split}_images"] += 1
            for name in names:
                table[name][f"{split}_boxes"] += 1

    fresh = [row for row in rows if row.image is not None and row.leak is None]
    add(train, "train")
    add(evaluation, "eval")
    add([row.image for row in fresh if not row.verified], "crawl")
    add([row.image for row in fresh if row.verified], "verified")
    for row in fresh:
        if not row.verified:
            for mention in row.caption.mentions:
                table[mention.category]["crawl_mentions"] += 1
    return table


def _manifest(
    options: WorldOptions,
    counts: dict,
    crawl_files: dict[str, list[str]],
    per_name: dict,
    verified: list[str],
) -> dict:
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()}
    del settings["out"]  # the world is relocatable: nothing in it names where it was written
    files = {
        "train_images": "images/train",
        "train_coco": "annotations/train_coco.json",
        "train_grounding": "annotations/train_grounding.json",
        "eval_images": "images/eval",
        "eval_coco": "annotations/eval_coco.json",
        "eval_grounding": "annotations/eval_grounding.json",
        "crawl_images": "crawl_images",
        "crawl_truth": "crawl_truth.json",
        "leaks": "leaks.json",
        "verified_coco": "annotations/verified_coco.json",
        "verified_images": "crawl_images",
        **crawl_files,
    }
    vocabulary = {
        "shapes": list(options.shapes),
        "colours": {name: list(rgb) for name, rgb in options.palette().items()},
        "categories": [category["name"] for category in _categories(options)],
    }
    return {
        "format": 2,
        "seed": options.seed,
        "options": settings,
        "counts": counts,
        "vocabulary": vocabulary,
        "rare_names": [f"{colour} {shape}" for colour, shape in options.rare_categories()],
        "per_name": per_name,
        "verified_uids": verified,
        "files": files,
        "base_url": options.base_url,
    }


def generate_world(options: WorldOptions) -> dict:
    """Write the world described by ``options`` under ``options.out``; return its manifest (world.json).

    The same options write byte-identical files. A world already at ``options.out`` is replaced; a
    non-empty folder without world.json raises FileExistsError. Paths in the manifest's ``files`` are
    relative to ``options.out``; human and verified boxes are COCO xywh, crawl truth boxes xyxy, all in
    pixels. The manifest names the rare names (``rare_names``, long-tailed or not), the images, boxes and
    crawl mentions per name (``per_name``) and the verified sample's uids (``verified_uids``).
    """
    out = Path(options.out)
    _prepare(out)
    train = _write_human_split(options, "train", TRAIN, options.train_images, out)
    evaluation = _write_human_split(options, "eval", EVAL, options.eval_images, out)
    rows = _crawl_rows(options, evaluation)
    crawl_files = _write_crawl(options, rows, out)
    counts = _counts(options, train, evaluation, rows)
    logger.info(
        "world: crawl of %d rows (%d served, %d leaks, %d verified)",
        len(rows),
        counts["crawl_images"],
        options.leaks,
        counts["verified_images"],
    )
    verified = [url_uid(_url(options, row.name)) for row in rows if row.verified]
    per_name = _per_name(options, train, evaluation, rows)
    manifest = _manifest(options, counts, crawl_files, per_name, verified)
    _write_json(out / "world.json", manifest, indent=2)
    return manifest


def _pair(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    return int(low), int(high or low)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def build_parser() -> argparse.ArgumentParser:
    defaults = WorldOptions()
    parser = argparse.ArgumentParser(prog="python -m jobs.world", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=defaults.out, help="output folder")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--shapes", type=_names, default=defaults.shapes, help=f"comma list from {sorted(MAX_ROTATION)}"
    )
    parser.add_argument(
        "--colours",
        type=_names,
        default=defaults.colours,
        help=f"comma list of {sorted(COLOURS)} or name=#rrggbb",
    )
    parser.add_argument(
        "--uniform",
        dest="long_tail",
        action="store_false",
        help="no long tail: the train split draws every name uniformly (the world of sessions 1-6)",
    )
    for name, meaning in (
        ("train_images", "human-annotated train images (default 400; 600 with --uniform)"),
        ("eval_images", "held-out images (default 600; 150 with --uniform)"),
        ("crawl_images", "fresh crawl images (default 800; 400 with --uniform)"),
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=meaning)
    for name in ("verified_images", "leaks", "dead_urls", "crawl_partitions", "jpeg_quality"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("image_size", "object_size", "objects_per_image", "rare_images"):
        low, high = getattr(defaults, name)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=_pair,
            default=(low, high),
            help=f"LOW,HIGH inclusive (default {low},{high})",
        )
    parser.add_argument("--base-url", default=defaults.base_url, help="crawl URLs are BASE/img/<name>.jpg")
    parser.add_argument(
        "--attribute-captions",
        action="store_true",
        help="give every training image a second grounding caption naming its objects by colour or shape alone",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    manifest = generate_world(WorldOptions(**vars(args)))
    print(json.dumps({"out": args.out, **manifest["counts"]}, indent=2))
    return manifest


if __name__ == "__main__":
    main()
