"""Cut source images into fixed-size tiles and write one "-Split" dataset split.

The authors' NWPU VHR-10-Split, DOTAv1.5-Split and HRSSD-Split sets are tiles cut from
the original images; border tiles are zero-padded to the full tile size.
Parsers of the raw formats (``nwpu``, ``dota``, ``voc``) produce :class:`SourceImage`
records; :func:`write_tiled_split` turns them into PNG tiles plus one COCO json.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from .coco_json import CocoJsonWriter, print_summary


@dataclass
class SourceImage:
    """One raw image with its horizontal boxes (xyxy, float pixels) and 0-based class ids."""

    path: Path
    stem: str  # unique name inside a split; tiles are named <stem>_<x0>_<y0>.png
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float64))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{self.path}: {len(self.boxes)} boxes but {len(self.labels)} labels")


@dataclass
class Tile:
    """A ``tile`` x ``tile`` crop at (x0, y0) of its source image, boxes in tile pixels."""

    x0: int
    y0: int
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


def tile_origins(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets along one axis: stride ``tile - overlap``, until the axis is covered.

    The last tile may run past the image end (it is zero-padded); an axis shorter than a
    tile gets a single tile at 0.
    """
    if tile <= 0:
        raise ValueError(f"tile size must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    stride = tile - overlap
    origins = [0]
    while origins[-1] + tile < length:
        origins.append(origins[-1] + stride)
    return origins


def tile_grid(width: int, height: int, tile: int, overlap: int) -> List[Tuple[int, int]]:
    """(x0, y0) of every tile, row by row."""
    return [(x0, y0) for y0 in tile_origins(height, tile, overlap) for x0 in tile_origins(width, tile, overlap)]


def clip_boxes_to_image(boxes: np.ndarray, labels: np.ndarray, width: int, height: int):
    """Clip boxes to the image and drop the ones left empty.

    Annotations sometimes run a little past the image; clipping first makes the
    visible-fraction test of :func:`assign_boxes` measure only real pixels.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels[keep]


def assign_boxes(boxes: np.ndarray, labels: np.ndarray, x0: int, y0: int, tile: int,
                 min_visible: float = 0.7):
    """Boxes of the tile at (x0, y0), in tile coordinates.

    A box is clipped to the tile and kept when the clipped area is at least
    ``min_visible`` of its full area and both clipped sides are at least 1 px.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(x0, x0 + tile)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(y0, y0 + tile)
    clipped_w = clipped[:, 2] - clipped[:, 0]
    clipped_h = clipped[:, 3] - clipped[:, 1]
    full_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        visible = np.where(full_area > 0, clipped_w * clipped_h / full_area, 0.0)
    keep = (clipped_w >= 1) & (clipped_h >= 1) & (visible >= min_visible)
    clipped = clipped[keep] - np.array([x0, y0, x0, y0], dtype=np.float64)
    return clipped, labels[keep]


def crop_padded(image: np.ndarray, x0: int, y0: int, tile: int) -> np.ndarray:
    """The ``tile`` x ``tile`` crop at (x0, y0); pixels outside the image are 0."""
    out = np.zeros((tile, tile) + image.shape[2:], dtype=image.dtype)
    crop = image[y0:y0 + tile, x0:x0 + tile]
    out[:crop.shape[0], :crop.shape[1]] = crop
    return out


def split_into_tiles(image: np.ndarray, boxes, labels, tile: int = 512, overlap: int = 64,
                     min_visible: float = 0.7) -> List[Tile]:
    """All tiles of ``image`` (H x W [x C]) with their boxes; see :func:`assign_boxes`."""
    height, width = image.shape[:2]
    boxes, labels = clip_boxes_to_image(boxes, labels, width, height)
    tiles = []
    for x0, y0 in tile_grid(width, height, tile, overlap):
        tile_boxes, tile_labels = assign_boxes(boxes, labels, x0, y0, tile, min_visible)
        tiles.append(Tile(x0, y0, crop_padded(image, x0, y0, tile), tile_boxes, tile_labels))
    return tiles


# ----------------------------------------------------------------------------------------
# Driver shared by the datasets/prepare_*.py scripts.
# ----------------------------------------------------------------------------------------

def read_image(path: Path) -> np.ndarray:
    """Read an image as stored (no EXIF rotation, which would desync the annotations).

    Raises an error naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source image not found: {path}")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if image is None:
        raise ValueError(f"cannot decode source image (corrupt or unsupported): {path}")
    return image


def check_sources_exist(sources: Iterable[SourceImage]) -> None:
    """Fail before writing anything when a source image is missing."""
    for source in sources:
        if not Path(source.path).is_file():
            raise FileNotFoundError(f"source image not found: {source.path}")


def seeded_split(names: Iterable[str], test_fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """Split source-image names into (train, test), reproducibly for a given seed."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test fraction must be in [0, 1], got {test_fraction}")
    names = sorted(set(names))
    random.Random(seed).shuffle(names)
    num_test = int(round(len(names) * test_fraction))
    return sorted(names[num_test:]), sorted(names[:num_test])


def default_output_root() -> str:
    return os.environ.get("SDCONET_DATASETS", "./datasets")


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every prepare script shares."""
    parser.add_argument("--src", required=True, help="folder of the raw public release")
    parser.add_argument("--out", default=default_output_root(),
                        help="datasets root (default: $SDCONET_DATASETS or ./datasets)")
    parser.add_argument("--tile", type=int, default=512, help="tile side in pixels (default 512)")
    parser.add_argument("--overlap", type=int, default=64, help="overlap of adjacent tiles in pixels (default 64)")
    parser.add_argument("--min-visible", type=float, default=0.7,
                        help="keep a cut box when at least this fraction of its area is inside the tile")
    parser.add_argument("--skip-empty", action="store_true", help="do not write tiles without objects")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing output split before writing it")


def write_tiled_split(sources: Sequence[SourceImage], split_dir: Path, split: str,
                      class_names: Sequence[str], tile: int = 512, overlap: int = 64,
                      min_visible: float = 0.7, skip_empty: bool = False,
                      overwrite: bool = False) -> dict:
    """Tile ``sources`` into ``split_dir/images`` and write ``split_dir/annotations/instances_<split>.json``.

    Returns the COCO dict that was written.
    """
    check_sources_exist(sources)
    split_dir = Path(split_dir)
    image_dir = split_dir / "images"
    json_path = split_dir / "annotations" / f"instances_{split}.json"
    if split_dir.exists() and any(split_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{split_dir} is not empty; pass --overwrite to replace it")
        shutil.rmtree(split_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    stems = [source.stem for source in sources]
    if len(set(stems)) != len(stems):
        raise ValueError(f"duplicate source names in split {split!r}; tiles would overwrite each other")

    writer = CocoJsonWriter(class_names)
    for source in tqdm(sources, desc=f"{split_dir.parent.name}/{split}", unit="img"):
        image = read_image(source.path)
        for piece in split_into_tiles(image, source.boxes, source.labels, tile, overlap, min_visible):
            if skip_empty and len(piece.boxes) == 0:
                continue
            file_name = f"{source.stem}_{piece.x0}_{piece.y0}.png"
            if not cv2.imwrite(str(image_dir / file_name), piece.image):
                raise OSError(f"cannot write tile {image_dir / file_name}")
            writer.add_image(file_name, tile, tile, piece.boxes, piece.labels)
    writer.write(json_path)
    coco = writer.to_dict()
    print_summary(coco, class_names, title=f"{split_dir.parent.name} / {split}")
    return coco
