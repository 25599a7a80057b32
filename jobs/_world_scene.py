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
REQUIRED_ATTEMPTS = 1000  # tries for an object that a scene must hold (see sample_scene's ``first``)


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene.

    ``polygon`` is float64 ``[N, 2]`` (x, y) in image pixels, possibly partly outside the image; ``box`` is
    its clipped extent ``(x0, y0, x1, y1)`` and ``area`` the clipped polygon's area (before occlusion by
    later objects), both in pixels; ``shade`` scales the colour (below 1 darker, above 1 brighter).
    """

    colour: str
    shape: str
    shade: float
    polygon: np.ndarray
    box: tuple[float, float, float, float]
    area: float

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
        [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ],
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


def clip_polygon(polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    """The part of a polygon (``[N, 2]``) inside ``[0, width] x [0, height]``, ``[M, 2]`` (M may be 0)."""
    if polygon.min() >= 0 and polygon[:, 0].max() <= width and polygon[:, 1].max() <= height:
        return polygon
    points = polygon
    for axis, high in ((0, float(width)), (1, float(height))):
        points = _clip_half_plane(points, axis, 0.0, keep_below=False)
        points = _clip_half_plane(points, axis, high, keep_below=True)
    return points


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a simple polygon ``[N, 2]``; 0 for fewer than three points."""
    if len(points) < 3:
        return 0.0
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


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
    visible = clip_polygon(polygon, width, height)
    if len(visible) < 3:
        return None
    # Intersections computed on the border can land a rounding error outside it; pin them to the image.
    low = np.clip(visible.min(axis=0), 0, [width, height])
    high = np.clip(visible.max(axis=0), 0, [width, height])
    box = (*low.tolist(), *high.tolist())
    full = (*polygon.min(axis=0), *polygon.max(axis=0))
    if _box_area(box) < MIN_VISIBLE * _box_area(full) or min(box[2] - box[0], box[3] - box[1]) < 6:
        return None
    if _overlaps_too_much(box, placed):
        return None
    shade = float(rng.uniform(0.82, 1.15))
    return SceneObject(colour, shape, shade, polygon, box, polygon_area(visible))


def _pick_category(
    rng: np.random.Generator,
    colours: tuple[str, ...],
    shapes: tuple[str, ...],
    placed: list[SceneObject],
    categories: tuple[tuple[str, str], ...] | None,
) -> tuple[str, str]:
    if placed and rng.random() < REPEAT_PROB:
        earlier = placed[int(rng.integers(len(placed)))]
        return earlier.colour, earlier.shape
    if categories is not None:
        return categories[int(rng.integers(len(categories)))]
    return colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]


def _place_required(
    rng: np.random.Generator,
    width: int,
    height: int,
    category: tuple[str, str],
    size_range: tuple[float, float],
) -> SceneObject:
    """The first object of a scene, of a given category: on an empty canvas a few tries always suffice
    unless the options make every object too small to keep, which is an error rather than a missing object."""
    for _ in range(REQUIRED_ATTEMPTS):
        candidate = _try_object(rng, width, height, category, size_range, [])
        if candidate is not None:
            return candidate
    raise ValueError(f"no {' '.join(category)} fits a {width}x{height} image with sizes {size_range}")


def sample_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    colours: tuple[str, ...],
    shapes: tuple[str, ...],
    object_size: tuple[int, int],
    object_count: int,
    attempts: int = 30,
    categories: tuple[tuple[str, str], ...] | None = None,
    first: tuple[str, str] | None = None,
) -> Scene:
    """Lay out up to ``object_count`` objects (at least one) in an image of ``size = (width, height)``.

    Object sizes (larger side, pixels) are uniform in ``object_size``, capped at 60% of the shorter image
    side so that a whole object always fits. An object that finds no place in ``attempts`` tries is dropped.
    Categories are drawn colour then shape, uniformly, unless ``categories`` lists the (colour, shape) pairs
    to draw from; an object may repeat an earlier one's category. ``first`` (colour, shape) is the category
    of the first object, which is always placed (a ValueError when no object of the size range can be kept).
    """
    width, height = size
    largest = min(float(object_size[1]), 0.6 * min(width, height))
    size_range = (min(float(object_size[0]), largest), largest)
    placed: list[SceneObject] = []
    if first is not None:
        placed.append(_place_required(rng, width, height, first, size_range))
    for _ in range(object_count - len(placed)):
        category = _pick_category(rng, colours, shapes, placed, categories)
        for _ in range(attempts):
            candidate = _try_object(rng, width, height, category, size_range, placed)
            if candidate is not None:
                placed.append(candidate)
                break
    return Scene(width, height, tuple(placed))


def _muted_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """``[count, 3]`` float32 low-saturation colours, so that no background reads as an object colour."""
    grey = rng.uniform(70, 195, size=(count, 1))
    return np.clip(grey + rng.normal(0, 12, size=(count, 3)), 0, 255).astype(np.float32)


def _direction_field(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """``[H, W]`` float32 coordinate along a random direction, in pixels."""
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.arange(width, dtype=np.float32)[None, :] * np.float32(math.cos(angle))
    return xs + np.arange(height, dtype=np.float32)[:, None] * np.float32(math.sin(angle))


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    along = _direction_field(rng, width, height)
    t = ((along - along.min()) / max(float(np.ptp(along)), 1.0))[..., None]
    start, end = _muted_colours(rng, 2)
    return start + (end - start) * t


def _stripes(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    period = rng.uniform(5, 20)  # in the half-resolution pattern: 10 to 40 image pixels
    t = (0.5 + 0.5 * np.sin(_direction_field(rng, width, height) * (2 * math.pi / period)))[..., None]
    first, second = _muted_colours(rng, 2)
    return first + (second - first) * t


def _blotches(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    cells = int(rng.integers(3, 9))
    grid = _muted_colours(rng, cells * cells).reshape(cells, cells, 3).astype(np.uint8)
    smooth = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float32)


BACKGROUNDS = (_gradient, _stripes, _blotches)


def _add_clutter(rng: np.random.Generator, image: Image.Image) -> None:
    """Thin lines, outlines and specks in muted colours: texture that is not an object."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for colour in _muted_colours(rng, int(rng.integers(4, 16))):
        fill = tuple(int(c) for c in colour)
        x0, x1 = rng.uniform(0, width, size=2)
        y0, y1 = rng.uniform(0, height, size=2)
        kind = rng.integers(3)
        if kind == 0:
            draw.line([(x0, y0), (x1, y1)], fill=fill, width=int(rng.integers(1, 3)))
        elif kind == 1:
            radius = rng.uniform(3, 14)
            draw.ellipse([x0 - radius, y0 - radius, x0 + radius, y0 + radius], outline=fill)
        else:
            draw.rectangle([x0, y0, x0 + rng.uniform(1, 4), y0 + rng.uniform(1, 4)], fill=fill)


def _coverage(polygon: np.ndarray, left: int, top: int, width: int, height: int) -> np.ndarray:
    """``[height, width]`` float32 in [0, 1]: the share of each window pixel that the polygon covers.

    PIL fills edge sub-pixels inclusively, so along left and top edges the coverage can run over by one
    sub-pixel (a quarter pixel); the boxes themselves come from the polygon, not from this raster.
    """
    mask = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    # PIL puts supersampled pixel j's centre at coordinate j; the continuous coordinate x lands at x*S - 0.5.
    points = (polygon - np.array([left, top])) * SUPERSAMPLE - 0.5
    ImageDraw.Draw(mask).polygon([tuple(p) for p in points.tolist()], fill=255)
    return np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def _paint_object(
    pixels: np.ndarray, item: SceneObject, rgb: tuple[int, int, int], rng: np.random.Generator
) -> None:
    """Alpha-blend one object into ``pixels`` (``[H, W, 3]`` float32), inside its box's pixel window."""
    left, top = int(math.floor(item.box[0])), int(math.floor(item.box[1]))
    right, bottom = int(math.ceil(item.box[2])), int(math.ceil(item.box[3]))
    alpha = _coverage(item.polygon, left, top, right - left, bottom - top)[..., None]
    # A gentle light ramp across the object keeps it from being a flat patch without changing its hue.
    ramp = np.linspace(-1, 1, bottom - top, dtype=np.float32)[:, None, None] * rng.uniform(-0.08, 0.08)
    colour = np.clip(np.array(rgb, dtype=np.float32) * item.shade * (1 + ramp), 0, 255)
    window = pixels[top:bottom, left:right]
    window[...] = window * (1 - alpha) + colour * alpha


def render_scene(
    rng: np.random.Generator, scene: Scene, palette: dict[str, tuple[int, int, int]]
) -> Image.Image:
    """RGB image of a scene: textured background, optional clutter, the objects in order, sensor noise."""
    # Backgrounds are smooth, so they are computed at half resolution and upsampled: a quarter of the work.
    pattern = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    background = pattern(rng, (scene.width + 1) // 2, (scene.height + 1) // 2)
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    image = image.resize((scene.width, scene.height), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        _add_clutter(rng, image)
    pixels = np.asarray(image, dtype=np.float32).copy()
    for item in scene.objects:
        _paint_object(pixels, item, palette[item.colour], rng)
    # Sensor-like noise, on luminance only: as convincing as per-channel noise at a third of the cost.
    noise = rng.standard_normal((scene.height, scene.width, 1), dtype=np.float32)
    pixels += noise * np.float32(rng.uniform(1.5, 7))
    # Adding 0.5 before the truncating cast rounds to the nearest level.
    np.clip(pixels + 0.5, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")
