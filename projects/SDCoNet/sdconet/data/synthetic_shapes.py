"""The four object classes of Synthetic_RS, drawn from above, and the drawing primitives.

* vehicle: small rotated car/truck with dark wind-screen and rear window;
* ship: elongated hull with a pointed bow and a bright superstructure;
* plane: fuselage crossed by swept wings and a tail plane;
* storage-tank: bright disc with a dark rim and a long round shadow.

Geometry is kept in COCO continuous pixel coordinates (pixel ``i`` covers ``[i, i + 1)``);
OpenCV draws pixel centres at integer coordinates, so drawing shifts by -0.5. An object's box
is the tight horizontal box of its drawn (rotated) parts; it includes half a pixel of
anti-aliasing around the exact outline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

SHIFT = 4  # sub-pixel bits for cv2 drawing
SCALE = 1 << SHIFT
# cv2's anti-aliased fills cover 0-1.2 px (median ~0.6) beyond the exact outline; the boxes
# include half a pixel of it so they stay tight around what is visible.
DRAWN_MARGIN = 0.5

VEHICLE, SHIP, PLANE, TANK = 1, 2, 3, 4

# BGR colours.
VEHICLE_COLOURS = ((228, 228, 230), (38, 38, 40), (172, 172, 178), (45, 45, 180), (150, 75, 40),
                   (112, 112, 118), (40, 185, 215), (200, 200, 205))
SHIP_HULL_COLOURS = ((205, 205, 210), (120, 122, 126), (55, 55, 140), (125, 85, 45), (45, 45, 48))
CONTAINER_COLOURS = ((40, 60, 170), (150, 90, 40), (60, 140, 60), (40, 160, 200), (180, 180, 180))


@dataclass
class Shape:
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
        return np.concatenate([np.min(lows, axis=0) - DRAWN_MARGIN, np.max(highs, axis=0) + DRAWN_MARGIN])



# ---------------------------------------------------------------- geometry and drawing


def place(local: np.ndarray, centre, angle: float) -> np.ndarray:
    """Rotate local (x along the object's length) points by ``angle`` and move them to ``centre``."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return np.asarray(local, dtype=np.float64) @ rot.T + np.asarray(centre, dtype=np.float64)


def rect(x0, x1, y0, y1) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def circle_polygon(cx, cy, r, n=20) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def cv_points(points: np.ndarray) -> np.ndarray:
    """COCO continuous coordinates -> fixed-point OpenCV coordinates (pixel centres at integers)."""
    return np.round((points - 0.5) * SCALE).astype(np.int32)


def draw_part(img: np.ndarray, part) -> None:
    kind, geom, colour = part
    colour = tuple(int(v) for v in colour) if img.ndim == 3 else int(colour)
    if kind == "poly":
        cv2.fillPoly(img, [cv_points(geom)], colour, cv2.LINE_AA, SHIFT)
    else:
        cx, cy, r = geom
        centre = tuple(int(v) for v in cv_points(np.array([cx, cy])))
        cv2.circle(img, centre, int(round(r * SCALE)), colour, -1, cv2.LINE_AA, SHIFT)


def jitter(rng, colour, amount) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float64) + rng.uniform(-amount, amount, 3), 0, 255)


def pick(rng, options):
    return options[int(rng.integers(len(options)))]



# ---------------------------------------------------------------- objects


def make_vehicle(rng, centre, angle) -> Shape:
    truck = rng.random() < 0.12
    length = rng.uniform(15, 22) if truck else rng.uniform(8, 15)
    width = length * (rng.uniform(0.36, 0.44) if truck else rng.uniform(0.42, 0.52))
    hl, hw = length / 2, width / 2
    body_colour = jitter(rng, pick(rng, VEHICLE_COLOURS), 12)
    glass = jitter(rng, (62, 52, 45), 8)
    if truck:
        cargo_colour = jitter(rng, pick(rng, CONTAINER_COLOURS + ((215, 215, 215),)), 15)
        local_parts = [
            (rect(0.24 * length, hl, -hw * 0.95, hw * 0.95), body_colour),
            (rect(0.36 * length, 0.45 * length, -hw * 0.8, hw * 0.8), glass),
            (rect(-hl, 0.2 * length, -hw, hw), cargo_colour),
        ]
    else:
        cut = min(0.22 * width, 1.4)
        body = np.array([[-hl + cut, -hw], [hl - cut, -hw], [hl, -hw + cut], [hl, hw - cut],
                         [hl - cut, hw], [-hl + cut, hw], [-hl, hw - cut], [-hl, -hw + cut]])
        roof = np.clip(body_colour * 1.08 + 6, 0, 255)
        local_parts = [
            (body, body_colour),
            (rect(-0.26 * length, 0.1 * length, -hw * 0.72, hw * 0.72), roof),
            (rect(0.1 * length, 0.3 * length, -hw * 0.8, hw * 0.8), glass),  # wind-screen
            (rect(-0.4 * length, -0.27 * length, -hw * 0.72, hw * 0.72), glass),  # rear window
        ]
    parts = [("poly", place(p, centre, angle), c) for p, c in local_parts]
    footprint = [parts[0][1]] if not truck else [parts[0][1], parts[2][1]]
    return Shape(VEHICLE, parts, footprint, shadow_length=0.18 * length)


def make_ship(rng, centre, angle, water_colour) -> Shape:
    length = rng.uniform(42, 60) if rng.random() < 0.08 else rng.uniform(14, 42)  # a few big ships
    width = length * rng.uniform(0.17, 0.26)
    hl, hw = length / 2, width / 2
    hull = np.array([[-hl, -hw * 0.85], [-hl + 0.05 * length, -hw], [0.18 * length, -hw],
                     [0.36 * length, -0.55 * hw], [hl, 0], [0.36 * length, 0.55 * hw],
                     [0.18 * length, hw], [-hl + 0.05 * length, hw], [-hl, hw * 0.85]])
    hull_colour = jitter(rng, pick(rng, SHIP_HULL_COLOURS), 10)
    deck_colour = np.clip(hull_colour * 0.8 + 40, 0, 255)
    local_parts = [(hull, hull_colour), (hull * np.array([0.86, 0.7]), deck_colour),
                   (rect(-0.42 * length, -0.2 * length, -0.36 * hw, 0.36 * hw),
                    jitter(rng, (238, 238, 240), 8))]
    if length > 24 and rng.random() < 0.6:  # cargo ship: rows of containers
        n_hatches = int(rng.integers(2, 5))
        edges = np.linspace(-0.14 * length, 0.3 * length, n_hatches + 1)
        for x0, x1 in zip(edges[:-1], edges[1:]):
            gap = 0.12 * (x1 - x0)
            local_parts.append((rect(x0 + gap, x1 - gap, -0.55 * hw, 0.55 * hw),
                                jitter(rng, pick(rng, CONTAINER_COLOURS), 15)))
    parts = [("poly", place(p, centre, angle), c) for p, c in local_parts]
    underlay = []
    if rng.random() < 0.5:  # moving: a faint wake behind the stern, not part of the box
        wake_length = length * rng.uniform(0.6, 1.5)
        wake = np.array([[-hl, -hw * 0.7], [-hl - wake_length, -hw * 1.6],
                         [-hl - wake_length, hw * 1.6], [-hl, hw * 0.7]])
        underlay.append(("poly", place(wake, centre, angle), np.clip(np.asarray(water_colour) + 14, 0, 255)))
    return Shape(SHIP, parts, [parts[0][1]], shadow_length=0.3 * width, underlay=underlay)


def make_plane(rng, centre, angle) -> Shape:
    span = rng.uniform(32, 42) if rng.random() < 0.08 else rng.uniform(14, 32)  # a few airliners
    length = span * rng.uniform(0.85, 1.05)
    fw = max(1.6, 0.1 * span)  # fuselage width
    sweep = span * rng.uniform(0.08, 0.25)
    colour = jitter(rng, pick(rng, ((235, 235, 238), (205, 205, 210), (220, 222, 225))), 8)
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
        engine_colour = jitter(rng, (95, 95, 100), 10)
        for side in (-1, 1):
            y = side * 0.27 * span
            x = lead - sweep * 0.54 + 0.04 * length
            local_parts.append((rect(x - 0.1 * length, x, y - 0.04 * span, y + 0.04 * span), engine_colour))
    if rng.random() < 0.5:  # coloured tail fin seen from above
        local_parts.append((rect(-0.5 * length, -0.36 * length, -fw * 0.3, fw * 0.3),
                            jitter(rng, pick(rng, CONTAINER_COLOURS), 20)))
    parts = [("poly", place(p, centre, angle), c) for p, c in local_parts]
    return Shape(PLANE, parts, [p[1] for p in parts[:3]], shadow_length=0.16 * span)


def make_tank(rng, centre) -> Shape:
    radius = rng.uniform(8, 30) / 2
    cx, cy = float(centre[0]), float(centre[1])
    rim = jitter(rng, (72, 74, 78), 10)
    top = np.clip(rng.uniform(205, 245) + rng.uniform(-4, 4, 3), 0, 255)
    parts = [("circle", (cx, cy, radius), rim), ("circle", (cx, cy, radius * 0.84), top)]
    if rng.random() < 0.5:  # floating roof
        parts.append(("circle", (cx, cy, radius * 0.58), np.clip(top - 28, 0, 255)))
    return Shape(TANK, parts, [circle_polygon(cx, cy, radius)], shadow_length=0.55 * radius)

