"""Generate the embedded demo world: coloured shapes, a human-annotated set, a caption crawl, an eval split.

    python -m jobs.world --out demo-out/world --seed 0

Everything is a function of the options and ``--seed``: the same command writes byte-identical files.
Layout under ``--out`` (paths relative to it are also listed in ``world.json``):

    images/train/*.jpg, images/eval/*.jpg          human-annotated and held-out images (disjoint)
    annotations/{train,eval}_coco.json             COCO detection (bbox xywh, categories "red circle", ...)
    annotations/{train,eval}_grounding.json        MDETR-style grounding: one images[] entry per caption,
                                                   annotations carry tokens_positive char spans
    crawl/part-NNNNN.parquet                       the crawl: columns url, caption (web alt-text)
    crawl_images/<name>.jpg                        what a server at --base-url serves as /img/<name>.jpg
    crawl_truth.json                               per crawl uid: true boxes (xyxy) and caption spans
    leaks.json                                     eval images that also sit in the crawl, and how altered
    world.json                                     manifest: options, counts, vocabulary, file paths

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
TRAIN, EVAL, CRAWL, LEAK, DEAD, NAMES, ORDER = range(1, 8)
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


@dataclass(frozen=True)
class WorldOptions:
    """What world to generate. Ranges are inclusive ``(low, high)`` pairs in pixels or counts.

    ``colours`` entries are palette names or ``name=#rrggbb`` for a colour of one's own.
    """

    out: str = "demo-out/world"
    seed: int = 0
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colours: tuple[str, ...] = DEFAULT_COLOURS
    train_images: int = 600
    eval_images: int = 150
    crawl_images: int = 400
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
        for field in ("shapes", "colours", "image_size", "object_size", "objects_per_image"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        self._check_vocabulary()
        self._check_numbers()

    def _check_vocabulary(self) -> None:
        unknown = [shape for shape in self.shapes if shape not in MAX_ROTATION]
        if unknown or not self.shapes or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes {list(self.shapes)} must be distinct names from {sorted(MAX_ROTATION)}")
        names = list(self.palette())
        if not names or len(names) != len(self.colours):
            raise ValueError(f"colours {list(self.colours)} must be distinct")

    def _check_numbers(self) -> None:
        for field in ("image_size", "object_size", "objects_per_image"):
            low, high = getattr(self, field)
            if not 0 < low <= high:
                raise ValueError(f"{field} must satisfy 0 < low <= high, got {(low, high)}")
        if self.image_size[0] < 32 or self.object_size[0] > 0.6 * self.image_size[0]:
            raise ValueError("image_size low must be >= 32 and object_size low <= 60% of it")
        counts = ("seed", "train_images", "eval_images", "crawl_images", "leaks", "dead_urls")
        if any(getattr(self, name) < 0 for name in counts) or self.crawl_partitions < 1:
            raise ValueError(f"{', '.join(counts)} must be >= 0 and crawl_partitions >= 1")
        if self.leaks > self.eval_images:
            raise ValueError(f"leaks ({self.leaks}) cannot exceed eval_images ({self.eval_images})")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError("jpeg_quality must be in [1, 95]")

    def palette(self) -> dict[str, tuple[int, int, int]]:
        """Colour name -> RGB, in option order."""
        return dict(_parse_colour(entry) for entry in self.colours)


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


def _sample(options: WorldOptions, rng: np.random.Generator) -> Scene:
    size = tuple(int(rng.integers(options.image_size[0], options.image_size[1] + 1)) for _ in range(2))
    count = int(rng.integers(options.objects_per_image[0], options.objects_per_image[1] + 1))
    return sample_scene(rng, size, tuple(options.palette()), options.shapes, options.object_size, count)


def _make_image(options: WorldOptions, stream: int, index: int, name: str) -> _Image:
    rng = _stream(options, stream, index)
    scene = _sample(options, rng)
    image = render_scene(rng, scene, options.palette())
    return _Image(name, scene, _encode(image, options.jpeg_quality))


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
    images = [_make_image(options, stream, index, f"{split}_{index:06d}.jpg") for index in range(count)]
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
    rows = []
    for index in range(options.crawl_images):
        image = _make_image(options, CRAWL, index, names[index])
        caption = crawl_caption(_stream(options, CRAWL, index, part=1), _groups(image.scene))
        rows.append(_CrawlRow(image.name, caption, image))
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
    return {"crawl": partitions}


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
    }


def _manifest(options: WorldOptions, counts: dict, crawl_files: dict[str, list[str]]) -> dict:
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
        **crawl_files,
    }
    vocabulary = {
        "shapes": list(options.shapes),
        "colours": {name: list(rgb) for name, rgb in options.palette().items()},
        "categories": [category["name"] for category in _categories(options)],
    }
    return {
        "format": 1,
        "seed": options.seed,
        "options": settings,
        "counts": counts,
        "vocabulary": vocabulary,
        "files": files,
        "base_url": options.base_url,
    }


def generate_world(options: WorldOptions) -> dict:
    """Write the world described by ``options`` under ``options.out``; return its manifest (world.json).

    The same options write byte-identical files. A world already at ``options.out`` is replaced; a
    non-empty folder without world.json raises FileExistsError. Paths in the manifest's ``files`` are
    relative to ``options.out``; human boxes are COCO xywh, crawl truth boxes xyxy, all in pixels.
    """
    out = Path(options.out)
    _prepare(out)
    train = _write_human_split(options, "train", TRAIN, options.train_images, out)
    evaluation = _write_human_split(options, "eval", EVAL, options.eval_images, out)
    rows = _crawl_rows(options, evaluation)
    crawl_files = _write_crawl(options, rows, out)
    counts = _counts(options, train, evaluation, rows)
    logger.info(
        "world: crawl of %d rows (%d served, %d leaks)", len(rows), counts["crawl_images"], options.leaks
    )
    manifest = _manifest(options, counts, crawl_files)
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
    for name in (
        "train_images",
        "eval_images",
        "crawl_images",
        "leaks",
        "dead_urls",
        "crawl_partitions",
        "jpeg_quality",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("image_size", "object_size", "objects_per_image"):
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
