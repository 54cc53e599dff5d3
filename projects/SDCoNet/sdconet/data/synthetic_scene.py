"""One Synthetic_RS tile: a seeded aerial scene (ground, fields, roads, water, buildings, trees,
blobs and bright clutter as distractors, cast shadows) with objects placed where they belong:
vehicles often on roads, ships always on water, planes often on a concrete apron, tanks often on
a pad.

Every tile gets its own generator seeded from ``(seed, split, index)``, so the same seed gives
the same bytes and tile ``i`` does not depend on how many tiles are generated.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .synthetic_shapes import (PLANE, SHIFT, SHIP, TANK, VEHICLE, Shape, circle_polygon, cv_points, draw_part, jitter,
                               make_plane, make_ship, make_tank, make_vehicle, pick, place, rect)

SPLIT_CODES = {"train": 0, "test": 1}  # mixed into the seed so train and test differ
EMPTY_TILE_PERIOD = 14  # every 14th tile (~7%) has no object, so even small splits hold negatives
MAX_OBJECTS_PER_TILE = 12
# Class frequencies (vehicle, ship, plane, storage-tank) on tiles with and without water; about half
# the tiles have water, which gives roughly 38% vehicles, 20% ships, 18% planes, 24% tanks overall.
WATER_TILE_PROBABILITY = 0.5
CLASS_WEIGHTS_WATER = (0.3, 0.4, 0.12, 0.18)
CLASS_WEIGHTS_LAND = (0.45, 0.0, 0.25, 0.3)
SENSOR_NOISE_STD = 2.5

# BGR colours.
GROUND_COLOURS = ((70, 118, 92), (95, 135, 160), (128, 133, 136), (140, 172, 190), (58, 92, 70))
FIELD_COLOURS = ((60, 130, 95), (80, 150, 120), (100, 150, 175), (70, 105, 125), (120, 160, 170),
                 (50, 110, 80), (110, 125, 130))
WATER_COLOURS = ((92, 70, 38), (100, 85, 45), (85, 78, 52), (110, 90, 60))
ROOF_COLOURS = ((120, 122, 128), (60, 70, 150), (80, 100, 125), (175, 178, 182), (95, 95, 100))


@dataclass
class Scene:
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


# ---------------------------------------------------------------- placing objects


def _sample_centre(rng, scene: Scene, category: int):
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
        return place(local[None], centre, area_angle)[0], angle
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


def _place_objects(rng, scene: Scene, categories, water_colour) -> list[Shape]:
    shapes, boxes = [], np.zeros((0, 4))
    for category in categories:
        for _ in range(25):
            centre, angle = _sample_centre(rng, scene, category)
            if centre is None:
                break
            if category == VEHICLE:
                shape = make_vehicle(rng, centre, angle)
            elif category == SHIP:
                shape = make_ship(rng, centre, angle, water_colour)
            elif category == PLANE:
                shape = make_plane(rng, centre, angle)
            else:
                shape = make_tank(rng, centre)
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
    for _ in range(int(pick(rng, (0, 1, 1, 2, 2, 3)))):
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
    return place(rect(-half[0], half[0], -half[1], half[1]), centre, angle)


def _land_point(rng, water: np.ndarray, size: int):
    ys, xs = np.nonzero(~water[::4, ::4])
    if len(xs) == 0:
        return None
    i = int(rng.integers(len(xs)))
    return np.array([xs[i] * 4 + 2.0, ys[i] * 4 + 2.0]) + rng.uniform(-2, 2, 2)


def _make_distractors(rng, scene: Scene, object_boxes: np.ndarray) -> list[Shape]:
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
        roof = jitter(rng, pick(rng, ROOF_COLOURS), 12)
        parts = [("poly", outline, roof)]
        if rng.random() < 0.6:  # gable: one half of the roof in shade
            parts.append(("poly", place(rect(-half[0], half[0], 0, half[1]), centre, angle), roof * 0.78))
        shape = Shape(0, parts, [outline], shadow_length=rng.uniform(0.2, 0.5) * half.min())
        if free(shape.box, centre):
            shapes.append(shape)
    for _ in range(int(rng.integers(0, 5))):  # tree clusters
        cluster = rng.uniform(0, size, 2)
        for _ in range(int(rng.integers(3, 14))):
            centre = cluster + rng.normal(0, 10, 2)
            r = rng.uniform(2, 5.5)
            shape = Shape(0, [("circle", (centre[0], centre[1], r), jitter(rng, (45, 82, 52), 12))],
                           [circle_polygon(centre[0], centre[1], r, 12)], shadow_length=0.8 * r)
            if free(shape.box, centre):
                shapes.append(shape)
    for _ in range(int(rng.integers(2, 10))):  # blobs: puddles, bushes, dirt, rocks
        centre = rng.uniform(0, size, 2)
        axes = rng.uniform(2, 12, 2)
        outline = place(np.stack([axes[0] * np.cos(np.linspace(0, 2 * np.pi, 16, endpoint=False)),
                                   axes[1] * np.sin(np.linspace(0, 2 * np.pi, 16, endpoint=False))], 1),
                         centre, rng.uniform(0, np.pi))
        grey = rng.uniform(40, 170)
        colour = np.clip(grey + rng.uniform(-20, 20, 3), 0, 255)  # muted: dirt, rocks, bushes, puddles
        shape = Shape(0, [("poly", outline, colour)], [], shadow_length=0.0)
        if free(shape.box, centre, on_land=False):
            shapes.append(shape)
    for _ in range(int(rng.integers(5, 30))):  # bright clutter: 1-3 px specks
        centre = rng.uniform(0, size, 2)
        half = rng.uniform(0.5, 1.5, 2)
        outline = _rotated_rect(centre, half, rng.uniform(0, np.pi))
        colour = jitter(rng, pick(rng, ((245, 245, 245), (80, 230, 240), (60, 60, 220), (230, 230, 160))), 10)
        shape = Shape(0, [("poly", outline, colour)], [], shadow_length=0.0)
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
        draw_part(layer, ("poly", outline, jitter(rng, pick(rng, FIELD_COLOURS), 10)))
        if rng.random() < 0.5:
            x0, y0 = np.clip(np.floor(outline.min(axis=0)).astype(int), 0, size)
            x1, y1 = np.clip(np.ceil(outline.max(axis=0)).astype(int), 0, size)
            if x1 <= x0 or y1 <= y0:
                continue
            mask = np.zeros((size, size), np.uint8)
            draw_part(mask, ("poly", outline, 1))
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
        colour = tuple(int(v) for v in jitter(rng, pick(rng, ((82, 84, 88), (150, 152, 156), (110, 125, 140))), 8))
        cv_line = [cv_points(points)]
        cv2.polylines(layer, cv_line, False, colour, int(round(width)), cv2.LINE_AA, SHIFT)
        cv2.polylines(road_mask, cv_line, False, 1, int(round(width)), cv2.LINE_8, SHIFT)
        if width > 10:  # dashed centre line
            dashes = [cv_points(points[i:i + 2]) for i in range(0, len(points) - 1, 4)]
            cv2.polylines(layer, dashes, False, (200, 205, 210), 1, cv2.LINE_AA, SHIFT)
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
    water_colour = jitter(rng, pick(rng, WATER_COLOURS), 8)

    # Flat colour layer: ground, fields, roads, then an apron for planes and a pad for tanks.
    layer = np.empty((size, size, 3), np.uint8)
    layer[:] = np.round(jitter(rng, pick(rng, GROUND_COLOURS), 12)).astype(np.uint8)
    rows_shade = _draw_fields(rng, layer)
    road_mask, road_points, road_angles, road_widths = _draw_roads(rng, layer, water)
    scene = Scene(size, water, road_mask, road_points, road_angles, road_widths, sun_angle=rng.uniform(0, 2 * np.pi))
    for name, category, colour in (("apron", PLANE, (168, 170, 172)), ("pad", TANK, (150, 165, 175))):
        if category in categories and rng.random() < 0.7:
            centre = _land_point(rng, water, size)
            if centre is not None:
                area = (centre, rng.uniform(35, 80, 2), rng.uniform(0, np.pi))
                setattr(scene, name, area)
                draw_part(layer, ("poly", _rotated_rect(*area), jitter(rng, colour, 8)))

    # Water with a sandy shore, then noise at several scales (weaker on water) and ploughed rows.
    image = layer.astype(np.float32)
    texture_weight = np.ones((size, size, 1), np.float32)
    land = np.ones((size, size, 1), np.float32)
    if has_water:
        water_u8 = water.astype(np.uint8)
        shore = cv2.dilate(water_u8, np.ones((5, 5), np.uint8)).astype(bool) & ~water
        image[shore] = 0.5 * image[shore] + 0.5 * jitter(rng, (150, 180, 195), 10).astype(np.float32)
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
            draw_part(image, part)

    # Cast shadows: each footprint swept along the sun direction darkens what is below it.
    shadow = np.zeros((size, size), np.uint8)
    direction = np.array([np.cos(scene.sun_angle), np.sin(scene.sun_angle)])
    for shape in distractors + shapes:
        for polygon in shape.footprint:
            swept = np.concatenate([polygon, polygon + direction * shape.shadow_length])
            hull = cv2.convexHull(swept.astype(np.float32))[:, 0, :].astype(np.float64)
            draw_part(shadow, ("poly", hull, 255))
    darkening = 1 - rng.uniform(0.4, 0.6) / 255 * shadow.astype(np.float32)
    image = (image * darkening[..., None]).astype(np.uint8)

    for shape in distractors + shapes:
        for part in shape.parts:
            draw_part(image, part)

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

