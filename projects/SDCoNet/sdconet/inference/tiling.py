"""Sliding-window tiling of large scenes and merging of per-tile detections.

Layout: tiles of ``tile`` x ``tile`` pixels step by ``tile - overlap``; the last tile of a row or
column is shifted back so it ends exactly at the border. Every tile therefore has the same size
and holds only real pixels (no zero padding that the detector never saw in training). A scene
smaller than a tile in one direction is covered by a single tile of the scene's size there.

Merging: each tile *owns* a core region, the part of the scene closer to its own centre than to a
neighbour's (overlaps are split at their middle; the cores partition the scene). A tile keeps only
the boxes whose centre lies in its core. If an object is smaller than the overlap, the tile owning
its centre sees it whole, while every cut view of it (a box clipped at a tile edge) has its centre
past the middle of the overlap, in the neighbour's core, so it is dropped: each such object is
found exactly once, with its full box. Objects larger than the overlap are seen cut by every tile;
their pieces cross a core border, so boxes that cross their tile's core border are additionally
merged with class-wise NMS (``torchvision.ops.batched_nms``). Boxes inside a core are never
touched by NMS, so a single tile returns the detector's output unchanged.
"""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torchvision.ops import batched_nms


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of the tiles along one axis of ``length`` pixels (last one ends at the border)."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _core_bounds(starts: Sequence[int], size: int) -> List[Tuple[float, float]]:
    """Half-open [low, high) core interval of every tile along one axis (outer ones unbounded)."""
    bounds = []
    for i, start in enumerate(starts):
        low = -float("inf") if i == 0 else (start + starts[i - 1] + size) / 2.0
        high = float("inf") if i == len(starts) - 1 else (starts[i + 1] + start + size) / 2.0
        bounds.append((low, high))
    return bounds


@dataclass(frozen=True)
class Tile:
    """One window of the scene: pixels [x0, x1) x [y0, y1) and its core region [cx0, cx1) x [cy0, cy1)."""

    x0: int
    y0: int
    x1: int
    y1: int
    core: Tuple[float, float, float, float]


def tile_grid(height: int, width: int, tile: int = 512, overlap: int = 128) -> List[Tile]:
    """Tiles covering a ``height`` x ``width`` scene, row by row; all of size min(tile, H) x min(tile, W)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"empty scene {height}x{width}")
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    th, tw = min(tile, height), min(tile, width)
    y_cores, x_cores = _core_bounds(ys, th), _core_bounds(xs, tw)
    return [Tile(x, y, x + tw, y + th, (xc[0], yc[0], xc[1], yc[1]))
            for y, yc in zip(ys, y_cores) for x, xc in zip(xs, x_cores)]


def read_tile(image: np.ndarray, tile: Tile) -> torch.Tensor:
    """CHW uint8 tensor of one tile, copied out of the HxWx3 scene array (the scene stays in numpy)."""
    return torch.from_numpy(np.ascontiguousarray(image[tile.y0:tile.y1, tile.x0:tile.x1].transpose(2, 0, 1)))


def merge_tile_detections(per_tile, tiles: Sequence[Tile], nms_iou: float = 0.5):
    """Merge detections made in tile pixels into scene-pixel detections.

    Args:
        per_tile: one (boxes (N, 4) xyxy in tile pixels, scores (N,), classes (N,)) per tile.
        tiles: the matching :class:`Tile` s.
        nms_iou: IoU threshold of the class-wise NMS applied to boxes that cross their tile's
            core border; ``None`` disables it.
    Returns:
        (boxes (M, 4) xyxy scene pixels, scores (M,), classes (M,)), sorted by decreasing score.
    """
    all_boxes, all_scores, all_classes, crossing = [], [], [], []
    for (boxes, scores, classes), t in zip(per_tile, tiles):
        boxes = boxes.float() + torch.tensor([t.x0, t.y0, t.x0, t.y0], dtype=torch.float32)
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        cx0, cy0, cx1, cy1 = t.core
        owned = (cx >= cx0) & (cx < cx1) & (cy >= cy0) & (cy < cy1)
        boxes, scores, classes = boxes[owned], scores[owned], classes[owned]
        crosses = (boxes[:, 0] < cx0) | (boxes[:, 1] < cy0) | (boxes[:, 2] > cx1) | (boxes[:, 3] > cy1)
        all_boxes.append(boxes)
        all_scores.append(scores.float())
        all_classes.append(classes.long())
        crossing.append(crosses)
    if not all_boxes:
        return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    boxes, scores, classes = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_classes)
    keep = torch.ones(len(boxes), dtype=torch.bool)
    crossing = torch.cat(crossing)
    if nms_iou is not None and crossing.any():
        candidates = crossing.nonzero().flatten()
        kept = batched_nms(boxes[candidates], scores[candidates], classes[candidates], nms_iou)
        keep[candidates] = False
        keep[candidates[kept]] = True
    order = scores[keep].argsort(descending=True, stable=True)
    return boxes[keep][order], scores[keep][order], classes[keep][order]
