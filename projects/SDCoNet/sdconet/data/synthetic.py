"""Built-in synthetic remote-sensing dataset ("Synthetic_RS"), so SDCoNet runs with no download.

Each tile is a seeded, procedurally drawn aerial scene: textured ground with fields, roads,
water, buildings, trees, blobs and bright clutter as distractors, cast shadows, and small
objects of four classes (``SYNTHETIC_RS_CLASSES``), each with its own look:

* vehicle: small rotated car/truck with dark wind-screen and rear window, often on roads;
* ship: elongated hull with a pointed bow and a bright superstructure, always on water;
* plane: fuselage crossed by swept wings and a tail plane, often on a concrete apron;
* storage-tank: bright disc with a dark rim and a long round shadow, often on a pad.

Geometry is kept in COCO continuous pixel coordinates (pixel ``i`` covers ``[i, i + 1)``);
OpenCV draws pixel centres at integer coordinates, so drawing shifts by -0.5. The GT box
is the tight horizontal box of the drawn (rotated) parts, clipped to the image; it includes
half a pixel of anti-aliasing around the exact outline.

Every tile gets its own generator seeded from ``(seed, split, index)``, so the same seed
gives the same bytes and tile ``i`` does not depend on how many tiles are generated.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from .metadata import SIZE_BANDS, SYNTHETIC_RS_CLASSES, size_band

DATASET_DIRNAME = "Synthetic_RS"
SPLIT_CODES = {"train": 0, "test": 1}  # mixed into the seed so train and test differ
EMPTY_TILE_PERIOD = 14  # every 14th tile (~7%) has no object, so even small splits hold negatives
MAX_OBJECTS_PER_TILE = 12
# Class frequencies (vehicle, ship, plane, storage-tank) on tiles with and without water; about half
# the tiles have water, which gives roughly 38% vehicles, 20% ships, 18% planes, 24% tanks overall.
WATER_TILE_PROBABILITY = 0.5
CLASS_WEIGHTS_WATER = (0.3, 0.4, 0.12, 0.18)
CLASS_WEIGHTS_LAND = (0.45, 0.0, 0.25, 0.3)
SENSOR_NOISE_STD = 2.5
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # fast; sensor noise leaves little to compress anyway
BOX_DECIMALS = 2
_SHIFT = 4  # sub-pixel bits for cv2 drawing
_SCALE = 1 << _SHIFT
# cv2's anti-aliased fills cover 0-1.2 px (median ~0.6) beyond the exact outline; the boxes
# include half a pixel of it so they stay tight around what is visible.
_DRAWN_MARGIN = 0.5

VEHICLE, SHIP, PLANE, TANK = 1, 2, 3, 4

# BGR colours.
GROUND_COLOURS = ((70, 118, 92), (95, 135, 160), (128, 133, 136), (140, 172, 190), (58, 92, 70))
FIELD_COLOURS = ((60, 130, 95), (80, 150, 120), (100, 150, 175), (70, 105, 125), (120, 160, 170),
                 (50, 110, 80), (110, 125, 130))
WATER_COLOURS = ((92, 70, 38), (100, 85, 45), (85, 78, 52), (110, 90, 60))
VEHICLE_COLOURS = ((228, 228, 230), (38, 38, 40), (172, 172, 178), (45, 45, 180), (150, 75, 40),
                   (112, 112, 118), (40, 185, 215), (200, 200, 205))
SHIP_HULL_COLOURS = ((205, 205, 210), (120, 122, 126), (55, 55, 140), (125, 85, 45), (45, 45, 48))
CONTAINER_COLOURS = ((40, 60, 170), (150, 90, 40), (60, 140, 60), (40, 160, 200), (180, 180, 180))
ROOF_COLOURS = ((120, 122, 128), (60, 70, 150), (80, 100, 125), (175, 178, 182), (95, 95, 100))


@dataclass
class _Shape:
    """A drawable thing: an object (category 1..4) or a distractor (category 0)."""

    category: int
    parts: list  # ("poly", points (N, 2), colour) or ("circle", (cx, cy, r), colour), drawn in order
    footprint: list  # polygons that cast a shadow
    shadow_length: float
    underlay: list = field(default_factory=list)  # parts drawn before shadows (e.g. a ship's wake)

    @property
    def box(self) -> np.ndarray:
        """Tight horizontal box (x0, y0, x1, y1) of all drawn parts, not clipped."""
        lows, highs = [], []
        for kind, geom, _ in self.parts:
            if kind == "poly":
                lows.append(geom.min(axis=0))
                highs.append(geom.max(axis=0))
            else:
                cx, cy, r = geom
                lows.append(np.array([cx - r, cy - r]))
                highs.append(np.array([cx + r, cy + r]))
        return np.concatenate([np.min(lows, axis=0) - _DRAWN_MARGIN, np.max(highs, axis=0) + _DRAWN_MARGIN])


@dataclass
class _Scene:
    """Per-tile context the placement of objects and distractors needs."""

    size: int
    water: np.ndarray  # bool (H, W)
    road_mask: np.ndarray  # bool (H, W)
    road_points: np.ndarray  # (N, 2) centre-line points
    road_angles: np.ndarray  # (N,) tangent angle at each point
    road_widths: np.ndarray  # (N,) road width at each point
    apron: tuple | None = None  # (centre, half_sizes, angle) of a concrete area for planes
    pad: tuple | None = None  # same for a tank farm pad
    sun_angle: float = 0.0


# ---------------------------------------------------------------- geometry helpers


def _place(local: np.ndarray, centre, angle: float) -> np.ndarray:
    """Rotate local (x along the object's length) points by ``angle`` and move them to ``centre``."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return np.asarray(local, dtype=np.float64) @ rot.T + np.asarray(centre, dtype=np.float64)


def _rect(x0, x1, y0, y1) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _circle_polygon(cx, cy, r, n=20) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _cv_points(points: np.ndarray) -> np.ndarray:
    """COCO continuous coordinates -> fixed-point OpenCV coordinates (pixel centres at integers)."""
    return np.round((points - 0.5) * _SCALE).astype(np.int32)


def _draw_part(img: np.ndarray, part) -> None:
    kind, geom, colour = part
    colour = tuple(int(v) for v in colour) if img.ndim == 3 else int(colour)
    if kind == "poly":
        cv2.fillPoly(img, [_cv_points(geom)], colour, cv2.LINE_AA, _SHIFT)
    else:
        cx, cy, r = geom
        centre = tuple(int(v) for v in _cv_points(np.array([cx, cy])))
        cv2.circle(img, centre, int(round(r * _SCALE)), colour, -1, cv2.LINE_AA, _SHIFT)


def _jitter(rng, colour, amount) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float64) + rng.uniform(-amount, amount, 3), 0, 255)


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _fractal_noise(rng, size: int, octaves, channels: int = 1) -> np.ndarray:
    """Noise at several scales: ``octaves`` is ((grid cells, amplitude), ...) from coarse to fine.

    Each coarser grid is upsampled bicubically to the next grid and summed there, so only the
    finest grid is resized to the full tile (cheap).
    """
    total = None
    for cells, amplitude in octaves:
        grid = amplitude * rng.standard_normal((cells, cells, channels), dtype=np.float32)
        if total is not None:
            grid += cv2.resize(total, (cells, cells), interpolation=cv2.INTER_CUBIC).reshape(grid.shape)
        total = grid
    return cv2.resize(total, (size, size), interpolation=cv2.INTER_CUBIC).reshape(size, size, channels)


# ---------------------------------------------------------------- objects


def _make_vehicle(rng, centre, angle) -> _Shape:
    truck = rng.random() < 0.12
    length = rng.uniform(15, 22) if truck else rng.uniform(8, 15)
    width = length * (rng.uniform(0.36, 0.44) if truck else rng.uniform(0.42, 0.52))
    hl, hw = length / 2, width / 2
    body_colour = _jitter(rng, _pick(rng, VEHICLE_COLOURS), 12)
    glass = _jitter(rng, (62, 52, 45), 8)
    if truck:
        cargo_colour = _jitter(rng, _pick(rng, CONTAINER_COLOURS + ((215, 215, 215),)), 15)
        local_parts = [
            (_rect(0.24 * length, hl, -hw * 0.95, hw * 0.95), body_colour),
            (_rect(0.36 * length, 0.45 * length, -hw * 0.8, hw * 0.8), glass),
            (_rect(-hl, 0.2 * length, -hw, hw), cargo_colour),
        ]
    else:
        cut = min(0.22 * width, 1.4)
        body = np.array([[-hl + cut, -hw], [hl - cut, -hw], [hl, -hw + cut], [hl, hw - cut],
                         [hl - cut, hw], [-hl + cut, hw], [-hl, hw - cut], [-hl, -hw + cut]])
        roof = np.clip(body_colour * 1.08 + 6, 0, 255)
        local_parts = [
            (body, body_colour),
            (_rect(-0.26 * length, 0.1 * length, -hw * 0.72, hw * 0.72), roof),
            (_rect(0.1 * length, 0.3 * length, -hw * 0.8, hw * 0.8), glass),  # wind-screen
            (_rect(-0.4 * length, -0.27 * length, -hw * 0.72, hw * 0.72), glass),  # rear window
        ]
    parts = [("poly", _place(p, centre, angle), c) for p, c in local_parts]
    footprint = [parts[0][1]] if not truck else [parts[0][1], parts[2][1]]
    return _Shape(VEHICLE, parts, footprint, shadow_length=0.18 * length)


def _make_ship(rng, centre, angle, water_colour) -> _Shape:
    length = rng.uniform(42, 60) if rng.random() < 0.08 else rng.uniform(14, 42)  # a few big ships
    width = length * rng.uniform(0.17, 0.26)
    hl, hw = length / 2, width / 2
    hull = np.array([[-hl, -hw * 0.85], [-hl + 0.05 * length, -hw], [0.18 * length, -hw],
                     [0.36 * length, -0.55 * hw], [hl, 0], [0.36 * length, 0.55 * hw],
                     [0.18 * length, hw], [-hl + 0.05 * length, hw], [-hl, hw * 0.85]])
    hull_colour = _jitter(rng, _pick(rng, SHIP_HULL_COLOURS), 10)
    deck_colour = np.clip(hull_colour * 0.8 + 40, 0, 255)
    local_parts = [(hull, hull_colour), (hull * np.array([0.86, 0.7]), deck_colour),
                   (_rect(-0.42 * length, -0.2 * length, -0.36 * hw, 0.36 * hw),
                    _jitter(rng, (238, 238, 240), 8))]
    if length > 24 and rng.random() < 0.6:  # cargo ship: rows of containers
        n_hatches = int(rng.integers(2, 5))
        edges = np.linspace(-0.14 * length, 0.3 * length, n_hatches + 1)
        for x0, x1 in zip(edges[:-1], edges[1:]):
            gap = 0.12 * (x1 - x0)
            local_parts.append((_rect(x0 + gap, x1 - gap, -0.55 * hw, 0.55 * hw),
                                _jitter(rng, _pick(rng, CONTAINER_COLOURS), 15)))
    parts = [("poly", _place(p, centre, angle), c) for p, c in local_parts]
    underlay = []
    if rng.random() < 0.5:  # moving: a faint wake behind the stern, not part of the box
        wake_length = length * rng.uniform(0.6, 1.5)
        wake = np.array([[-hl, -hw * 0.7], [-hl - wake_length, -hw * 1.6],
                         [-hl - wake_length, hw * 1.6], [-hl, hw * 0.7]])
        underlay.append(("poly", _place(wake, centre, angle), np.clip(np.asarray(water_colour) + 14, 0, 255)))
    return _Shape(SHIP, parts, [parts[0][1]], shadow_length=0.3 * width, underlay=underlay)


def _make_plane(rng, centre, angle) -> _Shape:
    span = rng.uniform(32, 42) if rng.random() < 0.08 else rng.uniform(14, 32)  # a few airliners
    length = span * rng.uniform(0.85, 1.05)
    fw = max(1.6, 0.1 * span)  # fuselage width
    sweep = span * rng.uniform(0.08, 0.25)
    colour = _jitter(rng, _pick(rng, ((235, 235, 238), (205, 205, 210), (220, 222, 225))), 8)
    fuselage = np.array([[-0.5 * length, -fw / 2], [0.36 * length, -fw / 2], [0.5 * length, 0],
                         [0.36 * length, fw / 2], [-0.5 * length, fw / 2]])
    lead, root, tip = 0.14 * length, 0.3 * length, 0.1 * length

    def swept(x_lead, half_span, root_chord, tip_chord, back):
        """Both wings of a swept surface: root on the fuselage axis, tips at +-half_span."""
        return np.array([[x_lead, 0], [x_lead - back, -half_span], [x_lead - back - tip_chord, -half_span],
                         [x_lead - root_chord, 0], [x_lead - back - tip_chord, half_span],
                         [x_lead - back, half_span]])

    wings = swept(lead, span / 2, root, tip, sweep)
    tail = swept(-0.34 * length, 0.19 * span, 0.14 * length, 0.06 * length, 0.5 * sweep)
    local_parts = [(wings, colour), (tail, colour), (fuselage, colour)]
    if span > 20:  # engines under the wings
        engine_colour = _jitter(rng, (95, 95, 100), 10)
        for side in (-1, 1):
            y = side * 0.27 * span
            x = lead - sweep * 0.54 + 0.04 * length
            local_parts.append((_rect(x - 0.1 * length, x, y - 0.04 * span, y + 0.04 * span), engine_colour))
    if rng.random() < 0.5:  # coloured tail fin seen from above
        local_parts.append((_rect(-0.5 * length, -0.36 * length, -fw * 0.3, fw * 0.3),
                            _jitter(rng, _pick(rng, CONTAINER_COLOURS), 20)))
    parts = [("poly", _place(p, centre, angle), c) for p, c in local_parts]
    return _Shape(PLANE, parts, [p[1] for p in parts[:3]], shadow_length=0.16 * span)


def _make_tank(rng, centre) -> _Shape:
    radius = rng.uniform(8, 30) / 2
    cx, cy = float(centre[0]), float(centre[1])
    rim = _jitter(rng, (72, 74, 78), 10)
    top = np.clip(rng.uniform(205, 245) + rng.uniform(-4, 4, 3), 0, 255)
    parts = [("circle", (cx, cy, radius), rim), ("circle", (cx, cy, radius * 0.84), top)]
    if rng.random() < 0.5:  # floating roof
        parts.append(("circle", (cx, cy, radius * 0.58), np.clip(top - 28, 0, 255)))
    return _Shape(TANK, parts, [_circle_polygon(cx, cy, radius)], shadow_length=0.55 * radius)


def _sample_centre(rng, scene: _Scene, category: int):
    """Centre (and orientation hint) of a new object, preferring realistic places."""
    size = scene.size
    angle = rng.uniform(0, 2 * np.pi)
    if category == VEHICLE and len(scene.road_points) and rng.random() < 0.6:
        i = int(rng.integers(len(scene.road_points)))
        tangent = scene.road_angles[i] + (np.pi if rng.random() < 0.5 else 0.0)
        normal = np.array([-np.sin(tangent), np.cos(tangent)])
        offset = rng.uniform(-0.3, 0.3) * scene.road_widths[i]
        return scene.road_points[i] + offset * normal, tangent + rng.normal(0, 0.06)
    area = scene.apron if category == PLANE else scene.pad if category == TANK else None
    if area is not None and rng.random() < 0.75:
        centre, half, area_angle = area
        local = rng.uniform(-0.85, 0.85, 2) * half
        return _place(local[None], centre, area_angle)[0], angle
    if category == SHIP:
        ys, xs = np.nonzero(scene.water[::2, ::2])
        if len(xs) == 0:
            return None, angle
        i = int(rng.integers(len(xs)))
        return np.array([xs[i] * 2 + 1.0, ys[i] * 2 + 1.0]) + rng.uniform(-1, 1, 2), angle
    return rng.uniform(2, size - 2, 2), angle


def _points_in(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    xs = np.clip(points[:, 0].astype(int), 0, w - 1)
    ys = np.clip(points[:, 1].astype(int), 0, h - 1)
    return mask[ys, xs]


def _overlap_fraction(box: np.ndarray, boxes: np.ndarray) -> float:
    """Largest intersection / smaller-box area between ``box`` and any of ``boxes``."""
    if len(boxes) == 0:
        return 0.0
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return float(np.max(iw * ih / np.maximum(np.minimum(area, areas), 1e-6)))


def _visible_fraction(box: np.ndarray, size: int) -> float:
    clipped = np.clip(box, 0, size)
    full = (box[2] - box[0]) * (box[3] - box[1])
    return float((clipped[2] - clipped[0]) * (clipped[3] - clipped[1]) / max(full, 1e-6))


def _place_objects(rng, scene: _Scene, categories, water_colour) -> list[_Shape]:
    shapes, boxes = [], np.zeros((0, 4))
    for category in categories:
        for _ in range(25):
            centre, angle = _sample_centre(rng, scene, category)
            if centre is None:
                break
            if category == VEHICLE:
                shape = _make_vehicle(rng, centre, angle)
            elif category == SHIP:
                shape = _make_ship(rng, centre, angle, water_colour)
            elif category == PLANE:
                shape = _make_plane(rng, centre, angle)
            else:
                shape = _make_tank(rng, centre)
            box = shape.box
            if _visible_fraction(box, scene.size) < 0.6 or _overlap_fraction(box, boxes) > 0.1:
                continue
            wet = _points_in(scene.water, np.concatenate(shape.footprint))
            if (category == SHIP and not wet.all()) or (category != SHIP and wet.any()):
                continue
            shapes.append(shape)
            boxes = np.concatenate([boxes, box[None]])
            break
    return shapes


# ---------------------------------------------------------------- scene layers


def _water_mask(rng, size: int) -> np.ndarray:
    """Smooth noise thresholded at a random level: coastlines, lakes and rivers of 20-50% of the tile."""
    noise = _fractal_noise(rng, size, ((int(rng.integers(2, 5)), 1.0), (16, 0.25)))[..., 0]
    level = np.quantile(noise[::4, ::4], 1.0 - rng.uniform(0.2, 0.5))
    return noise > level


def _roads(rng, size: int):
    """Centre lines of 0-3 straight or curved roads crossing the tile, with widths."""
    lines = []
    for _ in range(int(_pick(rng, (0, 1, 1, 2, 2, 3)))):
        start_side, end_side = rng.choice(4, 2, replace=False)

        def border_point(side):
            t = rng.uniform(0.1, 0.9) * size
            return np.array([(t, 0.0), (size, t), (t, size), (0.0, t)][side])

        p0, p2 = border_point(start_side), border_point(end_side)
        if rng.random() < 0.5:  # curved: quadratic Bezier through a displaced middle point
            p1 = (p0 + p2) / 2 + rng.normal(0, 0.25 * size, 2)
        else:
            p1 = (p0 + p2) / 2
        t = np.linspace(0, 1, 96)[:, None]
        points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        lines.append((points, rng.uniform(7, 15)))
    return lines


def _rotated_rect(centre, half, angle) -> np.ndarray:
    return _place(_rect(-half[0], half[0], -half[1], half[1]), centre, angle)


def _land_point(rng, water: np.ndarray, size: int):
    ys, xs = np.nonzero(~water[::4, ::4])
    if len(xs) == 0:
        return None
    i = int(rng.integers(len(xs)))
    return np.array([xs[i] * 4 + 2.0, ys[i] * 4 + 2.0]) + rng.uniform(-2, 2, 2)


def _make_distractors(rng, scene: _Scene, object_boxes: np.ndarray) -> list[_Shape]:
    """Buildings, trees, blobs and bright clutter kept off the objects."""
    size = scene.size
    grid_angle = rng.uniform(0, np.pi / 2)
    keep_out = object_boxes + np.array([-3, -3, 3, 3]) if len(object_boxes) else object_boxes
    shapes = []

    def free(box, centre, on_land=True):
        if on_land and (_points_in(scene.water, centre[None]).any() or _points_in(scene.road_mask, centre[None]).any()):
            return False
        if len(keep_out) == 0:
            return True
        iw = np.minimum(box[2], keep_out[:, 2]) - np.maximum(box[0], keep_out[:, 0])
        ih = np.minimum(box[3], keep_out[:, 3]) - np.maximum(box[1], keep_out[:, 1])
        return not np.any((iw > 0) & (ih > 0))

    for _ in range(int(rng.integers(0, 9))):  # buildings: larger, plain or gabled rectangles
        centre = rng.uniform(0, size, 2)
        half = rng.uniform(7, 22, 2)
        angle = grid_angle + (np.pi / 2) * int(rng.integers(2)) + rng.normal(0, 0.05)
        outline = _rotated_rect(centre, half, angle)
        roof = _jitter(rng, _pick(rng, ROOF_COLOURS), 12)
        parts = [("poly", outline, roof)]
        if rng.random() < 0.6:  # gable: one half of the roof in shade
            parts.append(("poly", _place(_rect(-half[0], half[0], 0, half[1]), centre, angle), roof * 0.78))
        shape = _Shape(0, parts, [outline], shadow_length=rng.uniform(0.2, 0.5) * half.min())
        if free(shape.box, centre):
            shapes.append(shape)
    for _ in range(int(rng.integers(0, 5))):  # tree clusters
        cluster = rng.uniform(0, size, 2)
        for _ in range(int(rng.integers(3, 14))):
            centre = cluster + rng.normal(0, 10, 2)
            r = rng.uniform(2, 5.5)
            shape = _Shape(0, [("circle", (centre[0], centre[1], r), _jitter(rng, (45, 82, 52), 12))],
                           [_circle_polygon(centre[0], centre[1], r, 12)], shadow_length=0.8 * r)
            if free(shape.box, centre):
                shapes.append(shape)
    for _ in range(int(rng.integers(2, 10))):  # blobs: puddles, bushes, dirt, rocks
        centre = rng.uniform(0, size, 2)
        axes = rng.uniform(2, 12, 2)
        outline = _place(np.stack([axes[0] * np.cos(np.linspace(0, 2 * np.pi, 16, endpoint=False)),
                                   axes[1] * np.sin(np.linspace(0, 2 * np.pi, 16, endpoint=False))], 1),
                         centre, rng.uniform(0, np.pi))
        grey = rng.uniform(40, 170)
        colour = np.clip(grey + rng.uniform(-20, 20, 3), 0, 255)  # muted: dirt, rocks, bushes, puddles
        shape = _Shape(0, [("poly", outline, colour)], [], shadow_length=0.0)
        if free(shape.box, centre, on_land=False):
            shapes.append(shape)
    for _ in range(int(rng.integers(5, 30))):  # bright clutter: 1-3 px specks
        centre = rng.uniform(0, size, 2)
        half = rng.uniform(0.5, 1.5, 2)
        outline = _rotated_rect(centre, half, rng.uniform(0, np.pi))
        colour = _jitter(rng, _pick(rng, ((245, 245, 245), (80, 230, 240), (60, 60, 220), (230, 230, 160))), 10)
        shape = _Shape(0, [("poly", outline, colour)], [], shadow_length=0.0)
        if free(shape.box, centre, on_land=False):
            shapes.append(shape)
    return shapes


@lru_cache(maxsize=4)
def _pixel_grid(size: int):
    """Pixel-centre coordinates (x, y) of a tile, shared by all tiles of one size."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xx, yy


def _draw_fields(rng, layer: np.ndarray) -> np.ndarray:
    """Rotated fields of flat colour on ``layer``; returns the shading of ploughed rows in some of them."""
    size = layer.shape[0]
    xx, yy = _pixel_grid(size)
    rows_shade = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(1, 7))):
        outline = _rotated_rect(rng.uniform(0, size, 2), rng.uniform(20, 80, 2), rng.uniform(0, np.pi))
        _draw_part(layer, ("poly", outline, _jitter(rng, _pick(rng, FIELD_COLOURS), 10)))
        if rng.random() < 0.5:
            x0, y0 = np.clip(np.floor(outline.min(axis=0)).astype(int), 0, size)
            x1, y1 = np.clip(np.ceil(outline.max(axis=0)).astype(int), 0, size)
            if x1 <= x0 or y1 <= y0:
                continue
            mask = np.zeros((size, size), np.uint8)
            _draw_part(mask, ("poly", outline, 1))
            theta, period = rng.uniform(0, np.pi), rng.uniform(3, 7)
            phase = (xx[y0:y1, x0:x1] * np.cos(theta) + yy[y0:y1, x0:x1] * np.sin(theta)) * (2 * np.pi / period)
            rows_shade[y0:y1, x0:x1] += mask[y0:y1, x0:x1] * np.sin(phase) * rng.uniform(4, 10)
    return rows_shade


def _draw_roads(rng, layer: np.ndarray, water: np.ndarray):
    """Roads on ``layer``; returns (road mask, dry centre-line points, their tangent angles, road widths)."""
    size = layer.shape[0]
    road_mask = np.zeros((size, size), np.uint8)
    points_out, angles_out, widths_out = [np.zeros((0, 2))], [np.zeros(0)], [np.zeros(0)]
    for points, width in _roads(rng, size):
        colour = tuple(int(v) for v in _jitter(rng, _pick(rng, ((82, 84, 88), (150, 152, 156), (110, 125, 140))), 8))
        cv_line = [_cv_points(points)]
        cv2.polylines(layer, cv_line, False, colour, int(round(width)), cv2.LINE_AA, _SHIFT)
        cv2.polylines(road_mask, cv_line, False, 1, int(round(width)), cv2.LINE_8, _SHIFT)
        if width > 10:  # dashed centre line
            dashes = [_cv_points(points[i:i + 2]) for i in range(0, len(points) - 1, 4)]
            cv2.polylines(layer, dashes, False, (200, 205, 210), 1, cv2.LINE_AA, _SHIFT)
        tangents = np.gradient(points, axis=0)
        dry = ~_points_in(water, points)
        points_out.append(points[dry])
        angles_out.append(np.arctan2(tangents[:, 1], tangents[:, 0])[dry])
        widths_out.append(np.full(int(dry.sum()), width))
    return road_mask.astype(bool), np.concatenate(points_out), np.concatenate(angles_out), np.concatenate(widths_out)


def render_tile(seed: int, split: str, index: int, size: int = 256):
    """Render tile ``index`` of ``split``: (BGR uint8 image (size, size, 3), [(category_id, x0, y0, x1, y1)]).

    Boxes are float COCO coordinates, clipped to the tile.
    """
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    has_water = rng.random() < WATER_TILE_PROBABILITY
    categories = []
    if index % EMPTY_TILE_PERIOD != EMPTY_TILE_PERIOD // 2:
        weights = CLASS_WEIGHTS_WATER if has_water else CLASS_WEIGHTS_LAND
        n_objects = int(rng.integers(1, MAX_OBJECTS_PER_TILE + 1))
        categories = [int(c) for c in rng.choice(4, n_objects, p=weights) + 1]
    water = _water_mask(rng, size) if has_water else np.zeros((size, size), bool)
    water_colour = _jitter(rng, _pick(rng, WATER_COLOURS), 8)

    # Flat colour layer: ground, fields, roads, then an apron for planes and a pad for tanks.
    layer = np.empty((size, size, 3), np.uint8)
    layer[:] = np.round(_jitter(rng, _pick(rng, GROUND_COLOURS), 12)).astype(np.uint8)
    rows_shade = _draw_fields(rng, layer)
    road_mask, road_points, road_angles, road_widths = _draw_roads(rng, layer, water)
    scene = _Scene(size, water, road_mask, road_points, road_angles, road_widths, sun_angle=rng.uniform(0, 2 * np.pi))
    for name, category, colour in (("apron", PLANE, (168, 170, 172)), ("pad", TANK, (150, 165, 175))):
        if category in categories and rng.random() < 0.7:
            centre = _land_point(rng, water, size)
            if centre is not None:
                area = (centre, rng.uniform(35, 80, 2), rng.uniform(0, np.pi))
                setattr(scene, name, area)
                _draw_part(layer, ("poly", _rotated_rect(*area), _jitter(rng, colour, 8)))

    # Water with a sandy shore, then noise at several scales (weaker on water) and ploughed rows.
    image = layer.astype(np.float32)
    texture_weight = np.ones((size, size, 1), np.float32)
    land = np.ones((size, size, 1), np.float32)
    if has_water:
        water_u8 = water.astype(np.uint8)
        shore = cv2.dilate(water_u8, np.ones((5, 5), np.uint8)).astype(bool) & ~water
        image[shore] = 0.5 * image[shore] + 0.5 * _jitter(rng, (150, 180, 195), 10).astype(np.float32)
        soft = cv2.GaussianBlur(water_u8.astype(np.float32), (5, 5), 1.0)[..., None]
        image = image * (1 - soft) + water_colour.astype(np.float32) * soft
        texture_weight -= 0.6 * soft
        land -= soft
    luminance = _fractal_noise(rng, size // 4, ((4, 10.0), (16, 7.0), (64, 4.0)))
    colour_noise = _fractal_noise(rng, size // 4, ((8, 3.0),), channels=3)
    shade = cv2.resize(luminance + colour_noise, (size, size), interpolation=cv2.INTER_LINEAR)
    image += shade * texture_weight + rows_shade[..., None] * land

    shapes = _place_objects(rng, scene, categories, water_colour)
    object_boxes = np.array([s.box for s in shapes]).reshape(-1, 4)
    distractors = _make_distractors(rng, scene, object_boxes)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for shape in shapes:
        for part in shape.underlay:
            _draw_part(image, part)

    # Cast shadows: each footprint swept along the sun direction darkens what is below it.
    shadow = np.zeros((size, size), np.uint8)
    direction = np.array([np.cos(scene.sun_angle), np.sin(scene.sun_angle)])
    for shape in distractors + shapes:
        for polygon in shape.footprint:
            swept = np.concatenate([polygon, polygon + direction * shape.shadow_length])
            hull = cv2.convexHull(swept.astype(np.float32))[:, 0, :].astype(np.float64)
            _draw_part(shadow, ("poly", hull, 255))
    darkening = 1 - rng.uniform(0.4, 0.6) / 255 * shadow.astype(np.float32)
    image = (image * darkening[..., None]).astype(np.uint8)

    for shape in distractors + shapes:
        for part in shape.parts:
            _draw_part(image, part)

    # Sensor: slight blur, illumination change and uniform noise of std SENSOR_NOISE_STD.
    image = cv2.GaussianBlur(image, (3, 3), 0.6).astype(np.float32)
    image = image * rng.uniform(0.88, 1.1) + rng.uniform(-10, 12)
    half_width = SENSOR_NOISE_STD * np.sqrt(3)
    image += (rng.random(image.shape, dtype=np.float32) - 0.5) * (2 * half_width)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    annotations = []
    for shape in shapes:
        x0, y0, x1, y1 = np.clip(shape.box, 0, size)
        annotations.append((shape.category, float(x0), float(y0), float(x1), float(y1)))
    return image, annotations


# ---------------------------------------------------------------- dataset files


def synthetic_split_paths(out_root, split: str) -> tuple[Path, Path]:
    """(image folder, COCO json path) of ``split`` under the datasets root ``out_root``."""
    split_dir = Path(out_root) / DATASET_DIRNAME / split
    return split_dir / "images", split_dir / "annotations" / f"instances_{split}.json"


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write ``data`` unless the file already holds exactly these bytes (keeps reruns cheap)."""
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.write_bytes(data)


def generate_split(out_root, split: str, num_images: int, size: int = 256, seed: int = 0) -> dict:
    """Write the images and COCO json of one split; returns its summary (see ``format_summary``)."""
    image_dir, json_path = synthetic_split_paths(out_root, split)
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    file_names = set()
    for index in range(num_images):
        image, boxes = render_tile(seed, split, index, size)
        file_name = f"{split}_{index:05d}.png"
        ok, encoded = cv2.imencode(".png", image, PNG_PARAMS)
        if not ok:
            raise RuntimeError(f"cv2 could not encode {file_name}")
        _write_if_changed(image_dir / file_name, encoded.tobytes())
        file_names.add(file_name)
        images.append({"id": index + 1, "file_name": file_name, "height": size, "width": size})
        for category_id, x0, y0, x1, y1 in boxes:
            w, h = round(x1 - x0, BOX_DECIMALS), round(y1 - y0, BOX_DECIMALS)
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": int(category_id),
                "bbox": [round(x0, BOX_DECIMALS), round(y0, BOX_DECIMALS), w, h],
                "area": round(w * h, BOX_DECIMALS), "iscrowd": 0,
            })
    # Tiles left over from an earlier, larger run would not be in the json: remove them.
    pattern = re.compile(rf"{re.escape(split)}_\d{{5}}\.png")
    for stale in image_dir.iterdir():
        if pattern.fullmatch(stale.name) and stale.name not in file_names:
            stale.unlink()
    coco = {
        "info": {"description": f"SDCoNet synthetic remote-sensing dataset, {split} split",
                 "seed": int(seed), "tile_size": int(size)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "object"}
                       for i, name in enumerate(SYNTHETIC_RS_CLASSES)],
    }
    _write_if_changed(json_path, json.dumps(coco, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return summarize_coco(coco, image_dir=image_dir, annotation_file=json_path)


def summarize_coco(coco: dict, image_dir=None, annotation_file=None) -> dict:
    """Counts of a COCO dict: images, empty images, objects per class and per size band."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = {name: 0 for name in names.values()}
    bands = {name: 0 for _, _, name in SIZE_BANDS}
    with_objects = set()
    for ann in coco["annotations"]:
        per_class[names[ann["category_id"]]] += 1
        bands[size_band(ann["bbox"][2], ann["bbox"][3])] += 1
        with_objects.add(ann["image_id"])
    return {
        "images": len(coco["images"]),
        "empty_images": len(coco["images"]) - len(with_objects),
        "objects": len(coco["annotations"]),
        "per_class": per_class,
        "size_bands": bands,
        "image_dir": str(image_dir) if image_dir is not None else None,
        "annotation_file": str(annotation_file) if annotation_file is not None else None,
    }


def generate_synthetic_dataset(out_root, num_train: int = 400, num_test: int = 100, size: int = 256,
                               seed: int = 0) -> dict:
    """Write ``<out_root>/Synthetic_RS/{train,test}``; returns ``{split: summary}``."""
    if size < 64:
        raise ValueError(f"tile size must be at least 64 px, got {size}")
    return {split: generate_split(out_root, split, count, size, seed)
            for split, count in (("train", num_train), ("test", num_test))}


def format_summary(summary: dict) -> str:
    """Human-readable summary: per split images, objects per class and object-size histogram."""
    lines = []
    for split, s in summary.items():
        lines.append(f"{DATASET_DIRNAME} {split}: {s['images']} images ({s['empty_images']} empty), "
                     f"{s['objects']} objects -> {s['annotation_file']}")
        lines.append("  per class: " + ", ".join(f"{k}={v}" for k, v in s["per_class"].items()))
        lines.append("  size (sqrt area, px): " + ", ".join(f"{k}={v}" for k, v in s["size_bands"].items()))
    return "\n".join(lines)


__all__ = ["DATASET_DIRNAME", "format_summary", "generate_split", "generate_synthetic_dataset",
           "render_tile", "summarize_coco", "synthetic_split_paths"]
