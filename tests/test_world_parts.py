"""Unit tests of the demo world's parts: shape geometry, rendering coverage, category draws, caption spans, the
rare-name rule."""

import numpy as np
import pytest

from jobs._world_scene import (
    COLOURS,
    DEFAULT_COLOURS,
    DEFAULT_SHAPES,
    MAX_ROTATION,
    clip_polygon,
    polygon_area,
    render_scene,
    sample_scene,
    unit_polygon,
)
from jobs._world_scene import _coverage as coverage
from jobs._world_text import CrawlStyle, Group, clean_caption, crawl_caption, plural, relation
from jobs.world import rare_categories

SQUARE = np.array([(10.0, 5.0), (30.0, 5.0), (30.0, 25.0), (10.0, 25.0)])


def test_polygon_area_and_clipping_by_hand():
    assert polygon_area(SQUARE) == pytest.approx(400.0)
    # The square hangs 5 px over the right border of a 25-px-wide image.
    clipped = clip_polygon(SQUARE, 25, 40)
    assert clipped.min(axis=0).tolist() == [10.0, 5.0]
    assert clipped.max(axis=0).tolist() == [25.0, 25.0]
    assert polygon_area(clipped) == pytest.approx(300.0)
    assert len(clip_polygon(SQUARE + 100, 50, 50)) == 0


def test_clipping_a_triangle_shrinks_its_other_extent():
    # Apex above the image: the visible part is a trapezoid whose top is the image's top edge.
    triangle = np.array([(20.0, -10.0), (40.0, 30.0), (0.0, 30.0)])
    clipped = clip_polygon(triangle, 100, 100)
    assert clipped.min(axis=0).tolist() == [0.0, 0.0]
    assert clipped.max(axis=0).tolist() == [40.0, 30.0]
    assert polygon_area(clipped) == pytest.approx(800.0 - 0.5 * 10 * 10)


def test_coverage_matches_the_square_to_a_quarter_pixel():
    alpha = coverage(SQUARE, 0, 0, 40, 30)
    assert alpha[10, 11:29].min() == 1.0 and alpha[15, 10:30].min() >= 0.99
    assert alpha[10, 8] == 0.0 and alpha[10, 31] == 0.0 and alpha[3, 15] == 0.0
    assert alpha.sum() == pytest.approx(400.0, abs=12.0)


@pytest.mark.parametrize("shape", sorted(MAX_ROTATION))
def test_every_shape_is_a_simple_polygon_of_positive_area(shape):
    points = unit_polygon(shape, np.random.default_rng(0))
    assert points.shape[1] == 2 and len(points) >= 3
    assert polygon_area(points) > 0.5


def test_scene_boxes_are_inside_and_cover_the_painted_colour():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scene = sample_scene(rng, (200, 150), DEFAULT_COLOURS, DEFAULT_SHAPES, (16, 120), 4)
        assert 1 <= len(scene.objects) <= 4
        pixels = np.asarray(render_scene(rng, scene, COLOURS), dtype=np.float32)
        assert pixels.shape == (150, 200, 3)
        for item in scene.objects:
            x0, y0, x1, y1 = item.box
            assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 150
            assert 0 < item.area <= (x1 - x0) * (y1 - y0) + 1e-6
        last = scene.objects[-1]  # drawn last, so nothing covers it
        if last.shape in ("circle", "square", "hexagon"):
            cx, cy = int((last.box[0] + last.box[2]) / 2), int((last.box[1] + last.box[3]) / 2)
            expected = np.array(COLOURS[last.colour]) * last.shade
            assert np.abs(pixels[cy, cx] - expected).max() < 45


def test_scene_draws_only_the_categories_given_and_always_places_the_first():
    rng = np.random.default_rng(5)
    allowed = (("red", "circle"), ("blue", "star"))
    for _ in range(30):
        scene = sample_scene(
            rng,
            (160, 160),
            DEFAULT_COLOURS,
            DEFAULT_SHAPES,
            (16, 120),
            5,
            categories=allowed,
            first=("green", "cross"),
        )
        assert scene.objects[0].category == "green cross"
        others = {item.category for item in scene.objects[1:]}
        assert others <= {"red circle", "blue star", "green cross"}  # a later object may repeat the first
    with pytest.raises(ValueError, match="no green cross fits"):
        sample_scene(rng, (160, 160), DEFAULT_COLOURS, DEFAULT_SHAPES, (4, 5), 1, first=("green", "cross"))


def test_scene_without_category_options_draws_as_before():
    first = sample_scene(np.random.default_rng(9), (200, 150), DEFAULT_COLOURS, DEFAULT_SHAPES, (16, 120), 5)
    again = sample_scene(
        np.random.default_rng(9), (200, 150), DEFAULT_COLOURS, DEFAULT_SHAPES, (16, 120), 5, categories=None
    )
    assert [(o.category, o.box) for o in first.objects] == [(o.category, o.box) for o in again.objects]


def test_rare_names_are_the_anti_diagonals_of_the_grid():
    rare = rare_categories(DEFAULT_COLOURS, DEFAULT_SHAPES)
    assert [f"{c} {s}" for c, s in rare] == [
        "red circle", "red hexagon", "green star", "blue triangle", "yellow square", "yellow cross",
        "purple circle", "purple hexagon", "orange star",
    ]  # fmt: skip
    # every colour and every shape is in a rare name and in a common one
    assert {c for c, _ in rare} == set(DEFAULT_COLOURS) and {s for _, s in rare} == set(DEFAULT_SHAPES)
    assert rare_categories(("cyan", "teal"), ("ellipse", "diamond")) == [("cyan", "ellipse")]
    assert rare_categories(("red",), ("circle",)) == [("red", "circle")]


def test_clean_caption_spans_name_every_box():
    groups = [
        Group("blue", "square", (1, 2), (150.0, 40.0)),
        Group("orange", "cross", (0,), (20.0, 40.0)),
    ]
    caption = clean_caption(np.random.default_rng(0), groups)
    assert "an orange cross" in caption.text and "two blue squares" in caption.text
    assert caption.text.index("orange") < caption.text.index("blue")  # left to right
    spans = {caption.text[m.start : m.end]: m.boxes for m in caption.mentions}
    assert spans == {"orange cross": (0,), "blue squares": (1, 2)}


def test_plural_and_relation():
    assert [plural(s) for s in ("cross", "circle", "star")] == ["crosses", "circles", "stars"]
    left = Group("red", "circle", (0,), (10.0, 50.0))
    right = Group("red", "star", (1,), (90.0, 55.0))
    below = Group("red", "star", (2,), (12.0, 150.0))
    assert relation(left, right) == "on the left of" and relation(right, left) == "on the right of"
    assert relation(left, below) == "above" and relation(below, left) == "below"


def test_crawl_captions_read_like_alt_text():
    rng = np.random.default_rng(0)
    groups = [
        Group("red", "circle", (0,), (30.0, 30.0), ("big", "bright")),
        Group("blue", "square", (1, 2), (120.0, 40.0)),
        Group("green", "star", (3, 4, 5), (60.0, 140.0), ("small",)),
    ]
    captions = [crawl_caption(rng, groups, CrawlStyle()) for _ in range(1500)]
    text = " || ".join(c.text for c in captions)
    kinds = {c.kind for c in captions}
    assert kinds == {"objects", "empty", "filler", "non_english"}
    for needle in ("two blue squares", "big red circle", "next to", "stock photo", "wallpaper", "IMG_"):
        assert needle in text.lower() or needle in text, needle
    assert any(w in text for w in ("above", "below", "on the left of", "on the right of"))
    assert any(w in text for w in ("several green stars", "some green stars", "3 green stars"))
    assert any(c.typo for c in captions) and any(c.text.strip() == "" for c in captions)
    partial = [c for c in captions if c.kind == "objects" and sum(len(m.boxes) for m in c.mentions) < 6]
    assert partial
    for caption in captions:
        for mention in caption.mentions:
            assert caption.text[mention.start : mention.end] == mention.text
            if not caption.typo:
                assert mention.category.split()[1] in mention.text
