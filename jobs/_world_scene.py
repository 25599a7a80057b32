"""Scenes of the demo world: coloured shapes laid out on textured backgrounds, and their exact boxes.

Coordinates are continuous pixels: pixel ``i`` covers ``[i, i + 1)``, so an image of width ``W`` spans
``[0, W]``. Every shape is a polygon (curved shapes with many vertices), which makes its extent exact: an
object's box is the extent of its polygon clipped to the image, ``xyxy`` with ``x1 > x0``. Boxes are the full
geometric (amodal) extent; the layout limits overlaps so that occlusion stays slight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Saturated, well separated hues: the demo detector is small and trains in minutes, so colours must be easy.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 85, 220),
    "yellow": (240, 210, 35),
    "purple": (140, 55, 195),
    "orange": (250, 130, 20),
    "cyan": (30, 200, 215),
    "pink": (245, 105, 185),
    "brown": (125, 75, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
DEFAULT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")

# Largest rotation (degrees) per shape: small for shapes whose identity depends on orientation (a square
# turned 45 degrees reads as a diamond), full turns where the shape looks alike at every angle.
MAX_ROTATION = {
    "circle": 0.0,
    "square": 15.0,
    "triangle": 25.0,
    "star": 180.0,
    "hexagon": 180.0,
    "cross": 30.0,
    "ellipse": 180.0,
    "diamond": 10.0,
    "pentagon": 180.0,
}
DEFAULT_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")

SUPERSAMPLE = 4  # sub-pixel grid per pixel for anti-aliased coverage
MAX_OVERLAP = 0.2  # largest box intersection, as a fraction of the smaller box
MIN_VISIBLE = 0.55  # smallest fraction of a box that must stay inside the image
BORDER_PROB = 0.15  # chance that an object is placed across the image border
REPEAT_PROB = 0.35  # chance that an object repeats an earlier category (gives "two blue squares")


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene.

    ``polygon`` is float64 ``[N, 2]`` (x, y) in image pixels, possibly partly outside the image; ``box`` is
    its clipped extent ``(x0, y0, x1, y1)``; ``shade`` scales the colour (below 1 darker, above 1 brighter).
    """

    colour: str
    shape: str
    shade: float
    polygon: np.ndarray
    box: tuple[float, float, float, float]

    @property
    def category(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[SceneObject, ...]


def _regular_polygon(vertices: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + np.arange(vertices) * (2 * math.pi / vertices)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular_polygon(points)
    inner_points = _regular_polygon(points, inner, phase=-math.pi / 2 + math.pi / points)
    return np.stack([outer, inner_points], axis=1).reshape(-1, 2)


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)],
        dtype=np.float64,
    )


def unit_polygon(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Shape outline centred at the origin, ``[N, 2]`` float64, before scaling and rotation."""
    if shape == "circle":
        return _regular_polygon(96)
    if shape == "ellipse":
        return _regular_polygon(96) * np.array([1.0, rng.uniform(0.45, 0.65)])
    if shape == "square":
        return np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64)
    if shape == "triangle":
        return _regular_polygon(3)
    if shape == "star":
        return _star()
    if shape == "hexagon":
        return _regular_polygon(6)
    if shape == "pentagon":
        return _regular_polygon(5)
    if shape == "cross":
        return _cross()
    if shape == "diamond":
        return np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], dtype=np.float64)
    raise ValueError(f"unknown shape {shape!r}; valid: {sorted(MAX_ROTATION)}")


def _placed_polygon(shape: str, size: float, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Outline rotated and scaled so that its larger side is ``size`` pixels, centred on ``centre``."""
    theta = math.radians(rng.uniform(-MAX_ROTATION[shape], MAX_ROTATION[shape]))
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    points = unit_polygon(shape, rng) @ rotation.T
    extent = points.max(axis=0) - points.min(axis=0)
    points = points * (size / extent.max())
    return points - (points.max(axis=0) + points.min(axis=0)) / 2 + centre


def _clip_half_plane(points: np.ndarray, axis: int, limit: float, keep_below: bool) -> np.ndarray:
    """One Sutherland-Hodgman step: keep the part of a polygon with coordinate ``axis`` on one side."""
    if len(points) == 0:
        return points
    following = np.roll(points, -1, axis=0)
    sign = 1.0 if keep_below else -1.0
    inside = sign * (limit - points[:, axis]) >= 0
    inside_next = np.roll(inside, -1)
    kept: list[np.ndarray] = []
    for point, nxt, point_in, next_in in zip(points, following, inside, inside_next):
        if point_in:
            kept.append(point)
        if point_in != next_in:
            t = (limit - point[axis]) / (nxt[axis] - point[axis])
            kept.append(point + t * (nxt - point))
    return np.array(kept).reshape(-1, 2)


def clipped_box(polygon: np.ndarray, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Extent ``(x0, y0, x1, y1)`` of the polygon's part inside ``[0, width] x [0, height]``, or None."""
    points = polygon
    for axis, low, high in ((0, 0.0, float(width)), (1, 0.0, float(height))):
        points = _clip_half_plane(points, axis, low, keep_below=False)
        points = _clip_half_plane(points, axis, high, keep_below=True)
    if len(points) < 3:
        return None
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def _box_area(box: tuple[float, float, float, float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _overlaps_too_much(box: tuple[float, ...], others: list[SceneObject]) -> bool:
    for other in others:
        ix = min(box[2], other.box[2]) - max(box[0], other.box[0])
        iy = min(box[3], other.box[3]) - max(box[1], other.box[1])
        if ix > 0 and iy > 0 and ix * iy > MAX_OVERLAP * min(_box_area(box), _box_area(other.box)):
            return True
    return False


def _sample_centre(rng: np.random.Generator, size: float, width: int, height: int) -> np.ndarray:
    """Centre of an object of larger side ``size``: inside the image, or across its border now and then."""
    # Letting up to a third of the object hang over the border; the visibility check in _try_object bounds it.
    margin = -size / 3 if rng.random() < BORDER_PROB else 0.0
    low = size / 2 + margin
    return np.array([rng.uniform(low, width - low), rng.uniform(low, height - low)])


def _try_object(
    rng: np.random.Generator,
    width: int,
    height: int,
    category: tuple[str, str],
    size_range: tuple[float, float],
    placed: list[SceneObject],
) -> SceneObject | None:
    colour, shape = category
    size = rng.uniform(*size_range)
    polygon = _placed_polygon(shape, size, _sample_centre(rng, size, width, height), rng)
    box = clipped_box(polygon, width, height)
    full = (*polygon.min(axis=0), *polygon.max(axis=0))
    if box is None or _box_area(box) < MIN_VISIBLE * _box_area(full) or min(box[2] - box[0], box[3] - box[1]) < 6:
        return None
    if _overlaps_too_much(box, placed):
        return None
    return SceneObject(colour, shape, float(rng.uniform(0.82, 1.15)), polygon, box)
