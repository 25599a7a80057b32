"""A round's report: ``rounds/r<k>/report.html``, the page a person reads to judge a round.

Content: the metrics table (teacher / baseline / student: AP, APr, AP50, R@1; a missing value shows as "n/a",
never as 0), the pseudo-labels' counts and, where truth exists, their precision and recall
(``pipeline.quality``), the score histogram of every label box with the keep-threshold marked, the kept box
count of the 20 most frequent phrase texts (lower-cased, spaces collapsed), a gallery of pseudo-labelled
images with their kept boxes and phrases drawn, and the lineage. Every text is HTML-escaped (captions come
from the web).

Kept boxes are those the read-time rule keeps (``pipeline.exports.Keep``: ``score > threshold``, and with its
``phrase_best`` each phrase's best box above that); labels are stored down to a floor score, so the histogram
shows what the rule drops.

Files: the page and its PNG images beside it in ``rounds/r<k>/report/``, linked relatively; images first and
the page last, each atomically (``storage.write_bytes``), so a page that exists has its images. Files rather
than data URIs: the page stays small and readable as text, each figure opens on its own, and a copy of the
round folder renders anywhere. Nothing refers outside that folder (no URL, no CDN, no remote font: the page
uses system fonts, the charts matplotlib's bundled DejaVu, the gallery Pillow's built-in font), so it works
offline. Charts are drawn on ``matplotlib.figure.Figure`` (Agg, without pyplot's global state).

A small inline script records, on the window load event, each image's ``naturalWidth`` in its
``data-natural-width`` attribute and marks ``<body data-images-checked="true">``, so a headless browser's DOM
dump tells whether every image loaded (``tests/test_report.py``).

Labels are read shard by shard and reduced on the way (score bins, phrase counts, a gallery of
``gallery_size`` rows, the rows that have truth), so memory does not grow with the crawl. The gallery is the
``gallery_size`` rows with a kept box whose ``sha256(seed, uid)`` ranks lowest: the same seed picks the same
images whatever the shard order. Images come from the label tars, or from the image shards where the label
run wrote label-only tars.
"""

from __future__ import annotations

import hashlib
import heapq
import html
import io
import json
import logging
import math
import numbers
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import ImageDraw

from pipeline import storage, tars
from pipeline.exports import Keep, iter_labels, keep_above
from pipeline.label import IMAGE_EXTENSIONS, decode_image
from pipeline.layout import Layout
from pipeline.quality import QualityReport, quality

logger = logging.getLogger(__name__)

MODELS = ("teacher", "baseline", "student")
# (column heading, key in a model's metrics)
METRIC_COLUMNS = (("AP", "ap"), ("APr", "apr"), ("AP50", "ap50"), ("R@1", "r1"))
MISSING = "n/a"
SCORE_BINS = np.linspace(0.0, 1.0, 51)
TOP_PHRASES = 20
GALLERY_SIDE = 320  # the longest side of a gallery image, pixels
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#008080", "#9a6324", "#800000")
IMAGE_FOLDER = "report"

_LOAD_SCRIPT = """window.addEventListener("load", function () {
  document.querySelectorAll("img").forEach(function (image) {
    image.setAttribute("data-natural-width", String(image.naturalWidth));
  });
  document.body.setAttribute("data-images-checked", "true");
});"""

_STYLE = """body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; width: 320px; font-size: 0.85em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }"""


def write_report(
    layout: Layout,
    round_number: int,
    *,
    teacher: str,
    metrics: Mapping[str, Mapping[str, Any]],
    lineage: Mapping[str, Any],
    threshold: float | Keep,
    truth: Mapping[str, Any] | None = None,
    gallery_size: int = 12,
    seed: int = 0,
) -> str:
    """Write the report of round ``round_number`` and return the page's path (``layout.round(k,
    "report.html")``; its images are in ``layout.round(k, "report")``).

    Args:
        teacher: the label folder whose finished shards the report shows (the round's teacher).
        metrics: model name -> {"ap", "apr", "ap50", "r1"}, as ``EvalResult.as_dict`` gives them (floats; a
            missing model or key is "n/a").
        lineage: any JSON-able mapping, shown pretty-printed.
        threshold: the keep rule: a threshold (boxes with ``score > threshold`` are kept) or a ``Keep``.
        truth: the crawl's true boxes (``pipeline.quality``'s format), for precision and recall; None: n/a.
        gallery_size: how many pseudo-labelled images the gallery shows (fewer if fewer have a kept box).
        seed: chooses the gallery images.
    """
    summary = LabelSummary(threshold, gallery_size, seed, truth)
    for shard, table in iter_labels(layout, teacher):
        summary.add(shard, table)
    images = {
        "scores.png": score_histogram(
            summary.kept_scores, summary.dropped_scores, Keep.of(threshold).threshold
        ),
        "phrases.png": phrase_chart(summary.phrase_counts.most_common(TOP_PHRASES)),
    }
    gallery = gallery_images(layout, teacher, summary.gallery_rows(), threshold)
    images.update({item.name: item.png for item in gallery if item.png is not None})
    for name, data in images.items():
        storage.write_bytes(layout.fs, layout.round(round_number, f"{IMAGE_FOLDER}/{name}"), data)
    page = render_page(round_number, teacher, metrics, lineage, summary, gallery)
    path = layout.round(round_number, "report.html")
    storage.write_bytes(layout.fs, path, page.encode("utf-8"))
    logger.info("report of round %d (%d gallery images) written to %s", round_number, len(gallery), path)
    return path


def kept_boxes(row: Mapping[str, Any], threshold: float | Keep) -> list[Mapping[str, Any]]:
    """The boxes of a label row kept at read time (``Keep``; a float: ``score > threshold``)."""
    return Keep.of(threshold).row_boxes(row["boxes"])


# ------------------------------------------------------------------------------------ label summary


@dataclass
class LabelSummary:
    """What the report shows of a teacher's labels, gathered shard by shard (``add``)."""

    threshold: float | Keep
    gallery_size: int
    seed: int
    truth: Mapping[str, Any] | None = None
    images: int = 0
    boxes: int = 0
    kept: int = 0
    kept_scores: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_BINS) - 1, np.int64))
    dropped_scores: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_BINS) - 1, np.int64))
    phrase_counts: Counter = field(default_factory=Counter)
    # a heap of (-rank, shard, uid, row) whose top is the highest rank, the first to go
    _gallery: list = field(default_factory=list, init=False)
    _truth_rows: list = field(default_factory=list, init=False)  # per shard, its rows that have truth
    _truth_uids: pa.Array = field(init=False)

    def __post_init__(self) -> None:
        samples = self.truth.get("samples", self.truth) if self.truth is not None else {}
        self._truth_uids = pa.array(sorted(samples), pa.string())

    def add(self, shard: str, table: pa.Table) -> None:
        self.images += table.num_rows
        self._add_scores(table)
        for row in table.select(["uid", "caption", "width", "height", "phrases", "boxes"]).to_pylist():
            kept = kept_boxes(row, self.threshold)
            self.kept += len(kept)
            self.phrase_counts.update(_phrase_key(row["phrases"][box["phrase"]]["text"]) for box in kept)
            if kept:
                self._offer(shard, row)
        if self.truth is not None:
            self._truth_rows.append(table.filter(pc.is_in(table["uid"], value_set=self._truth_uids)))

    def _add_scores(self, table: pa.Table) -> None:
        boxes = table["boxes"].combine_chunks()
        flat = boxes.flatten()
        scores = flat.field("score").to_numpy(zero_copy_only=False)
        self.boxes += len(scores)
        rows = pc.list_parent_indices(boxes).to_numpy()
        kept = Keep.of(self.threshold).mask(scores, rows, flat.field("phrase").to_numpy(zero_copy_only=False))
        self.kept_scores += np.histogram(np.clip(scores[kept], 0, 1), SCORE_BINS)[0]
        self.dropped_scores += np.histogram(np.clip(scores[~kept], 0, 1), SCORE_BINS)[0]

    def _offer(self, shard: str, row: dict[str, Any]) -> None:
        digest = hashlib.sha256(f"{self.seed}/{row['uid']}".encode()).digest()
        entry = (-int.from_bytes(digest[:8], "big"), shard, row["uid"], row)
        if len(self._gallery) < self.gallery_size:
            heapq.heappush(self._gallery, entry)
        elif self.gallery_size and entry[0] > self._gallery[0][0]:
            heapq.heapreplace(self._gallery, entry)

    def gallery_rows(self) -> list[tuple[str, dict[str, Any]]]:
        """``(shard, row)`` of the chosen gallery images, lowest rank first."""
        return [(shard, row) for _, shard, _, row in sorted(self._gallery, reverse=True)]

    def quality(self) -> QualityReport | None:
        """Precision and recall of the kept boxes against the truth (None without truth)."""
        if self.truth is None or not self._truth_rows:
            return None
        return quality(keep_above(pa.concat_tables(self._truth_rows), self.threshold), self.truth)


def _rule(threshold: float | Keep) -> str:
    keep = Keep.of(threshold)
    rule = f"score > {keep.threshold:g}"
    return rule if keep.phrase_best is None else f"{rule}, or a phrase's best box > {keep.phrase_best:g}"


def _phrase_key(text: str) -> str:
    return " ".join(text.lower().split())


# ------------------------------------------------------------------------------------------- charts


def score_histogram(kept: np.ndarray, dropped: np.ndarray, threshold: float) -> bytes:
    """A PNG: box counts per score bin (``SCORE_BINS``), dropped and kept stacked, the threshold marked."""
    figure = Figure(figsize=(6.4, 3.4), dpi=100, layout="constrained")
    axes = figure.subplots()
    left, widths = SCORE_BINS[:-1], np.diff(SCORE_BINS)
    axes.bar(left, dropped, widths, align="edge", color="#b8b8b8", label="dropped")
    axes.bar(left, kept, widths, bottom=dropped, align="edge", color="#2b7bba", label="kept")
    axes.axvline(threshold, color="#d62728", linestyle="--", label=f"keep-threshold {threshold:g}")
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("box score")
    axes.set_ylabel("boxes")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(f"Scores of {int(kept.sum() + dropped.sum())} label boxes")
    axes.legend()
    return _png(figure)


def phrase_chart(counts: Sequence[tuple[str, int]]) -> bytes:
    """A PNG: kept boxes per phrase text, most frequent on top."""
    figure = Figure(figsize=(6.4, 1.2 + 0.25 * max(len(counts), 4)), dpi=100, layout="constrained")
    axes = figure.subplots()
    if not counts:
        axes.set_axis_off()
        axes.text(0.5, 0.5, "no kept boxes", ha="center", va="center")
        return _png(figure)
    names = [_shorten(name, 40) for name, _ in counts]
    positions = np.arange(len(counts))[::-1]
    axes.barh(positions, [count for _, count in counts], color="#2b7bba")
    axes.set_yticks(positions, names, parse_math=False)  # phrases are web text: "$" is not mathtext
    axes.set_xlabel("kept boxes")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(f"Kept boxes of the {len(counts)} most frequent phrases")
    return _png(figure)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


# ------------------------------------------------------------------------------------------ gallery


@dataclass(frozen=True)
class GalleryItem:
    """One gallery entry: ``png`` is None when its image was not found or did not decode."""

    name: str
    shard: str
    row: dict[str, Any]
    png: bytes | None


def gallery_images(
    layout: Layout, teacher: str, rows: Sequence[tuple[str, dict[str, Any]]], threshold: float | Keep
) -> list[GalleryItem]:
    """The gallery rows drawn with their kept boxes, in the given order."""
    wanted: dict[str, set[str]] = {}
    for shard, row in rows:
        wanted.setdefault(shard, set()).add(row["uid"])
    found = {shard: read_images(layout, teacher, shard, uids) for shard, uids in wanted.items()}
    items = []
    for number, (shard, row) in enumerate(rows):
        data = found[shard].get(row["uid"])
        png = draw_boxes(data, row, threshold) if data is not None else None
        if png is None:
            logger.warning("gallery image %s of shard %s not found or not decodable", row["uid"], shard)
        items.append(GalleryItem(f"gallery-{number:02d}.png", shard, row, png))
    return items


def read_images(layout: Layout, teacher: str, shard: str, uids: Iterable[str]) -> dict[str, bytes]:
    """uid -> image bytes of ``uids``: from the label tar, else (label-only tars) from the image shard."""
    wanted = set(uids)
    found = _tar_images(layout.fs, layout.label_shard(teacher, shard, ".tar"), {uid: uid for uid in wanted})
    missing = wanted - set(found)
    if missing and layout.fs.exists(layout.image_shard(shard, ".parquet")):
        index = storage.read_parquet(layout.fs, layout.image_shard(shard, ".parquet"), ["key", "uid"])
        keys = {row["key"]: row["uid"] for row in index.to_pylist() if row["uid"] in missing}
        found.update(_tar_images(layout.fs, layout.image_shard(shard, ".tar"), keys))
    return found


def _tar_images(fs: Any, path: str, uid_of_key: Mapping[str, str]) -> dict[str, bytes]:
    """uid -> the first image member of the samples of ``path`` whose key ``uid_of_key`` names."""
    found: dict[str, bytes] = {}
    if not uid_of_key or not fs.exists(path):
        return found
    for sample in tars.iter_samples(fs, path):
        if isinstance(sample, tars.TarProblem) or sample["__key__"] not in uid_of_key:
            continue
        extension = next((suffix for suffix in sorted(sample) if suffix in IMAGE_EXTENSIONS), None)
        if extension is not None:
            found[uid_of_key[sample["__key__"]]] = sample[extension]
    return found


def draw_boxes(data: bytes, row: Mapping[str, Any], threshold: float | Keep) -> bytes | None:
    """A PNG of the image scaled to a longest side of ``GALLERY_SIDE`` (up or down, so that every gallery
    image reads the same), with the kept boxes and their phrases and scores drawn; None when the bytes do not
    decode."""
    image, _ = decode_image(data)
    if image is None:
        return None
    scale = GALLERY_SIDE / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    scale_x, scale_y = image.width / row["width"], image.height / row["height"]
    draw = ImageDraw.Draw(image)
    for box in kept_boxes(row, threshold):
        colour = PALETTE[box["phrase"] % len(PALETTE)]
        x0, y0, x1, y1 = box["x0"] * scale_x, box["y0"] * scale_y, box["x1"] * scale_x, box["y1"] * scale_y
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        text = f"{row['phrases'][box['phrase']]['text']} {box['score']:.2f}"
        draw.rectangle(draw.textbbox((x0, y0), text), fill=colour)
        draw.text((x0, y0), text, fill="white")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- page


def render_page(
    round_number: int,
    teacher: str,
    metrics: Mapping[str, Mapping[str, Any]],
    lineage: Mapping[str, Any],
    summary: LabelSummary,
    gallery: Sequence[GalleryItem],
) -> str:
    """The report's HTML; every text escaped, images linked as ``report/<name>``."""
    title = html.escape(f"Round {round_number} report: teacher {teacher}")
    sections = [
        f"<h1>{title}</h1>",
        "<h2>Held-out metrics</h2>",
        metrics_table(metrics),
        "<h2>Pseudo-labels</h2>",
        labels_table(summary),
        _image("scores.png", "score histogram of the label boxes"),
        _image("phrases.png", "kept boxes per phrase"),
        "<h2>Gallery</h2>",
        gallery_html(gallery, summary.threshold),
        "<h2>Lineage</h2>",
        f'<pre id="lineage">{html.escape(json.dumps(lineage, indent=2, sort_keys=True, default=str))}</pre>',
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>\n{_STYLE}\n</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + f"\n<script>\n{_LOAD_SCRIPT}\n</script>\n</body>\n</html>\n"
    )


def metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """Rows teacher / baseline / student, columns ``METRIC_COLUMNS``."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in METRIC_COLUMNS)
    rows = []
    for model in MODELS:
        values = metrics.get(model) or {}
        cells = "".join(
            f'<td data-metric="{key}">{format_value(values.get(key))}</td>' for _, key in METRIC_COLUMNS
        )
        rows.append(f'<tr data-model="{model}"><td>{model}</td>{cells}</tr>')
    return f'<table id="metrics">\n<tr><th>model</th>{head}</tr>\n' + "\n".join(rows) + "\n</table>"


def labels_table(summary: LabelSummary) -> str:
    """Counts of the label boxes and, where truth exists, precision and recall of the kept ones."""
    report = summary.quality()
    rows = [
        ("images", str(summary.images)),
        ("boxes (all, down to the floor score)", str(summary.boxes)),
        (f"kept boxes ({_rule(summary.threshold)})", str(summary.kept)),
        ("keep-threshold", f"{Keep.of(summary.threshold).threshold:g}"),
        ("precision of kept boxes", format_value(report.precision if report else None)),
        ("recall of named objects", format_value(report.recall if report else None)),
        ("images with truth", str(report.images) if report else MISSING),
    ]
    body = "\n".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(value)}</td></tr>" for name, value in rows
    )
    return f'<table id="labels">\n{body}\n</table>'


def gallery_html(gallery: Sequence[GalleryItem], threshold: float | Keep) -> str:
    if not gallery:
        return "<p>No pseudo-labelled image has a kept box.</p>"
    figures = []
    for item in gallery:
        picture = _image(item.name, item.row["caption"]) if item.png else "<p>(image not found)</p>"
        about = f"{item.row['uid']} · {item.shard} · kept boxes: {len(kept_boxes(item.row, threshold))}"
        caption = f"{html.escape(item.row['caption'])}<br><small>{html.escape(about)}</small>"
        figures.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
    return '<div class="gallery">\n' + "\n".join(figures) + "\n</div>"


def format_value(value: Any) -> str:
    """A metric to 3 decimals; None, NaN or anything not a number is ``MISSING``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        return MISSING
    return f"{value:.3f}"


def _image(name: str, alt: str) -> str:
    return f'<img src="{IMAGE_FOLDER}/{html.escape(name)}" alt="{html.escape(alt)}">'
