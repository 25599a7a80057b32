"""The round report (``pipeline.report``): offline, escaped, and rendered by headless Chromium with every image.

The root is built by hand: two finished label shards of one teacher (one whose tar holds the images, one
label-only whose images are in the image shard under img2dataset's keys) and one unfinished shard.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from pipeline import storage, tars
from pipeline.label import label_stage
from pipeline.layout import Layout
from pipeline.ledger import Ledger
from pipeline.report import LabelSummary, write_report
from pipeline.schema import LABEL_SCHEMA

TEACHER = "teacher-a"
THRESHOLD = 0.5
SIZE = (96, 64)
XSS = "<script>alert(1)</script>"
METRICS = {
    "teacher": {"ap": 0.5, "apr": 0.2, "ap50": 0.7, "r1": 0.9},
    "baseline": {"ap": 0.55, "apr": None, "ap50": 0.72, "r1": 0.95},
    "student": {"ap": 0.6, "apr": 0.3, "ap50": float("nan")},  # r1 missing
}
LINEAGE = {"teacher": TEACHER, "note": "<script>alert(2)</script>", "threshold": {"value": THRESHOLD}}
# Chromium: headless, no sandbox (root in CI), no GPU, nothing fetched in the background; virtual time runs
# the page (and its load event) to completion before the DOM is dumped.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--virtual-time-budget=10000",
    "--dump-dom",
)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(40, 220, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    ImageDraw.Draw(image).ellipse((10, 10, 40, 40), fill=(230, 20, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _box(phrase: int, x0: float, y0: float, x1: float, y1: float, score: float) -> dict:
    return {"phrase": phrase, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "score": score}


def _row(uid: str, shard: str, caption: str, phrases: list[str], boxes: list[dict]) -> dict:
    spans = [{"text": p, "start": caption.index(p), "end": caption.index(p) + len(p)} for p in phrases]
    return {
        "uid": uid,
        "url": f"http://example.test/{uid}.jpg",
        "sha256": "00",
        "source_shard": shard,
        "width": SIZE[0],
        "height": SIZE[1],
        "caption": caption,
        "phrases": spans,
        "boxes": boxes,
        "teacher": TEACHER,
        "round": 0,
        "config_hash": "cfg",
        "created_at": "2025-01-01T00:00:00+00:00",
    }


SHARD_A = [  # images in the label tar
    _row(
        "a0",
        "part/00000",
        "a red circle and a blue square",
        ["red circle", "blue square"],
        # kept: a true red circle, a misplaced blue square; exactly at the threshold (not kept): the true one
        [_box(0, 10, 10, 40, 40, 0.9), _box(1, 50, 10, 90, 50, 0.7), _box(1, 55, 5, 85, 35, THRESHOLD)],
    ),
    _row("a1", "part/00000", f"{XSS} a green star", ["green star"], [_box(0, 5, 5, 30, 30, 0.8)]),
    _row("a2", "part/00000", r"a $\frac$ sign", [r"$\frac$ sign"], [_box(0, 1, 1, 20, 20, 0.6)]),
    _row("a3", "part/00000", "nothing kept here", ["nothing"], [_box(0, 1, 1, 20, 20, 0.35)]),
]
SHARD_B = [  # label-only tars: images in the image shard
    _row("b0", "part/00001", "a yellow triangle", ["yellow triangle"], [_box(0, 3, 3, 60, 50, 0.75)]),
    _row("b1", "part/00001", "two yellow triangles", ["yellow triangles"], [_box(0, 30, 3, 90, 60, 0.95)]),
    _row("b2", "part/00001", "no boxes at all", ["boxes"], []),
]
UNFINISHED = [_row("c0", "part/00002", "UNFINISHED shard", ["shard"], [_box(0, 1, 1, 9, 9, 0.9)])]
GALLERY_UIDS = {"a0", "a1", "a2", "b0", "b1"}  # the rows with a kept box
TRUTH = {
    "samples": {
        "a0": {
            "boxes": [
                {"bbox": [10, 10, 40, 40], "category": "red circle"},
                {"bbox": [55, 5, 85, 35], "category": "blue square"},
            ],
            "mentions": [
                {"start": 2, "end": 12, "category": "red circle", "boxes": [0]},
                {"start": 19, "end": 30, "category": "blue square", "boxes": [1]},
            ],
        }
    }
}


def _write_shard(layout: Layout, shard: str, rows: list[dict], label_only: bool, finished: bool) -> None:
    table = pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)
    storage.write_parquet(layout.fs, layout.label_shard(TEACHER, shard, ".parquet"), table)
    images = {row["uid"]: _jpeg(n) for n, row in enumerate(rows)}
    samples = [
        {"__key__": row["uid"], **({} if label_only else {"jpg": images[row["uid"]]}), "json": b"{}"}
        for row in rows
    ]
    tars.write_samples(layout.fs, layout.label_shard(TEACHER, shard, ".tar"), samples)
    if label_only:  # img2dataset's keys, their uids in the image shard's parquet
        keys = [f"{shard[-1]}{n:08d}" for n in range(len(rows))]
        index = pa.table({"key": keys, "uid": [row["uid"] for row in rows]})
        storage.write_parquet(layout.fs, layout.image_shard(shard, ".parquet"), index)
        image_samples = [{"__key__": key, "jpg": images[row["uid"]]} for key, row in zip(keys, rows)]
        tars.write_samples(layout.fs, layout.image_shard(shard, ".tar"), image_samples)
    if finished:
        Ledger(layout, label_stage(TEACHER)).record(shard, {})


def _report(root: Path, **options) -> Path:
    layout = Layout(str(root))
    _write_shard(layout, "part/00000", SHARD_A, label_only=False, finished=True)
    _write_shard(layout, "part/00001", SHARD_B, label_only=True, finished=True)
    _write_shard(layout, "part/00002", UNFINISHED, label_only=False, finished=False)
    arguments = {"teacher": TEACHER, "metrics": METRICS, "lineage": LINEAGE, "threshold": THRESHOLD}
    return Path(write_report(layout, 3, **{**arguments, **options}))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return _report(tmp_path_factory.mktemp("report") / "root", truth=TRUTH)


class _Page(HTMLParser):
    """What the tests read off a page: its images, body attributes, metric cells and labels table."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.body: dict = {}
        self.metrics: dict[str, dict[str, str]] = {}
        self.cells: dict[str, list[str]] = {}  # table id -> its cells' texts
        self._table = ""
        self._model: str | None = None
        self._metric: str | None = None
        self._cell = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes)
        elif tag == "body":
            self.body = attributes
        elif tag == "table":
            self._table = attributes.get("id", "")
        elif tag == "tr" and "data-model" in attributes:
            self._model = attributes["data-model"]
            self.metrics[self._model] = {}
        self._metric = attributes.get("data-metric") if tag == "td" else self._metric
        self._cell = tag == "td"

    def handle_endtag(self, tag: str) -> None:
        self._cell = self._cell and tag != "td"
        self._metric = None if tag == "td" else self._metric

    def handle_data(self, data: str) -> None:
        if self._cell:
            self.cells.setdefault(self._table, []).append(data)
        if self._metric is not None and self._model is not None:
            self.metrics[self._model][self._metric] = data


def _chromium_dom(page: Path, profile: Path) -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: run `make install` (it installs Debian's chromium package)")
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_report_renders_in_headless_chromium_with_every_image_loaded(report, tmp_path) -> None:
    page = _Page(_chromium_dom(report, tmp_path / "profile"))
    assert page.body.get("data-images-checked") == "true", "the load script did not run"
    assert len(page.images) == 2 + len(GALLERY_UIDS)  # score histogram, phrase counts, the gallery
    for image in page.images:
        assert int(image["data-natural-width"]) > 0, f"{image['src']} did not load"
    assert list(page.metrics) == ["teacher", "baseline", "student"]
    assert page.metrics["teacher"] == {"ap": "0.500", "apr": "0.200", "ap50": "0.700", "r1": "0.900"}
    assert page.metrics["baseline"]["apr"] == "n/a"
    assert page.metrics["student"] == {"ap": "0.600", "apr": "0.300", "ap50": "n/a", "r1": "n/a"}


def test_the_chromium_check_sees_an_image_that_did_not_load(report, tmp_path) -> None:
    broken = report.with_name("broken.html")
    broken.write_text(report.read_text().replace('src="report/scores.png"', 'src="report/missing.png"'))
    widths = {i["src"]: i["data-natural-width"] for i in _Page(_chromium_dom(broken, tmp_path / "p")).images}
    assert widths["report/missing.png"] == "0" and widths["report/phrases.png"] != "0"


def test_the_report_is_offline_escaped_and_counts_kept_boxes_strictly_above_the_threshold(report) -> None:
    text = report.read_text()
    assert not re.search(r"https?://", text)
    assert not re.search(r"""(src|href)\s*=\s*["']?[a-z][a-z0-9+.-]*:""", text, re.I)
    assert XSS not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text  # the lineage
    assert text.count("<script") == 1  # the load script only
    assert "UNFINISHED" not in text  # a shard without a ledger entry is not read
    page = _Page(text)
    for image in page.images:
        assert (report.parent / image["src"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (report.parent / image["src"]).parent == report.parent / "report"
    captions = {row["caption"] for row in SHARD_A + SHARD_B if row["uid"] in GALLERY_UIDS}
    assert {image["alt"] for image in page.images[2:]} == captions  # both tar layouts, kept boxes only
    # kept: a0 2 (not the box at exactly 0.5), a1 1, a2 1, b0 1, b1 1; precision 1/2, recall 1/2 on a0
    cells = page.cells["labels"]
    rows = dict(zip(cells[0::2], cells[1::2]))
    assert rows["images"] == "7" and rows["boxes (all, down to the floor score)"] == "8"
    assert rows[f"kept boxes (score > {THRESHOLD:g})"] == "6"
    assert rows["precision of kept boxes"] == "0.500" and rows["recall of named objects"] == "0.500"


def test_the_gallery_is_seeded_and_independent_of_shard_order(tmp_path) -> None:
    first = _report(tmp_path / "one", gallery_size=2, seed=7)
    again = _report(tmp_path / "two", gallery_size=2, seed=7)
    assert first.read_text() == again.read_text()
    assert "n/a" in first.read_text()  # no truth: precision and recall are n/a
    tables = {
        "a": pa.Table.from_pylist(SHARD_A, LABEL_SCHEMA),
        "b": pa.Table.from_pylist(SHARD_B, LABEL_SCHEMA),
    }
    forward = _gallery_uids(tables, seed=7)
    assert forward == _gallery_uids(dict(reversed(tables.items())), seed=7)
    assert len(forward) == 3 and set(forward) <= GALLERY_UIDS
    assert len({tuple(_gallery_uids(tables, seed)) for seed in range(8)}) > 1  # the seed matters


def _gallery_uids(tables: dict[str, pa.Table], seed: int) -> list[str]:
    summary = LabelSummary(THRESHOLD, gallery_size=3, seed=seed)
    for shard, table in tables.items():
        summary.add(shard, table)
    return [row["uid"] for _, row in summary.gallery_rows()]


def test_an_empty_teacher_still_gives_a_page_with_its_charts(tmp_path) -> None:
    layout = Layout(str(tmp_path / "root"))
    path = Path(write_report(layout, 0, teacher=TEACHER, metrics={}, lineage={}, threshold=THRESHOLD))
    page = _Page(path.read_text())
    assert len(page.images) == 2 and all((path.parent / i["src"]).exists() for i in page.images)
    assert all(value == "n/a" for cells in page.metrics.values() for value in cells.values())
