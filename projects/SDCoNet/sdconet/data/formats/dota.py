"""Parser of DOTA ``labelTxt`` files (v1.0 / v1.5 / v2.0 share the format).

Each file may start with ``imagesource:...`` and ``gsd:...`` header lines; then one
object per line: ``x1 y1 x2 y2 x3 y3 x4 y4 class difficult``. SDCoNet detects horizontal
boxes, so each polygon becomes the min/max box of its four corners.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np

from .tiling import SourceImage
from .voc import ClassNameMatcher, find_image


def parse_label_txt(path: Path, class_names: Sequence[str], skip_difficult: bool = False):
    """Boxes (xyxy, float pixels) and 0-based labels of one DOTA label file."""
    path = Path(path)
    matcher = ClassNameMatcher(class_names)
    boxes, labels = [], []
    for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 9:
            if ":" in line:  # header such as "imagesource:GoogleEarth" or "gsd:0.146"
                continue
            raise ValueError(f"{path}:{line_no}: expected 8 coordinates, a class and a difficulty, got {line!r}")
        try:
            coords = np.asarray([float(v) for v in fields[:8]]).reshape(4, 2)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: bad coordinates in {line!r}") from e
        difficult = len(fields) > 9 and fields[9] == "1"
        if skip_difficult and difficult:
            continue
        labels.append(matcher(fields[8], f"{path}:{line_no}"))
        boxes.append([*coords.min(axis=0), *coords.max(axis=0)])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def load_dota_split(split_dir: Path, class_names: Sequence[str], skip_difficult: bool = False,
                    label_dir_name: str = "labelTxt") -> List[SourceImage]:
    """Sources of ``split_dir/{images,labelTxt}``; every label file must have its image."""
    split_dir = Path(split_dir)
    label_dir, image_dir = split_dir / label_dir_name, split_dir / "images"
    for folder in (label_dir, image_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"DOTA folder not found: {folder}")
    sources = []
    for label_path in sorted(label_dir.glob("*.txt")):
        boxes, labels = parse_label_txt(label_path, class_names, skip_difficult)
        sources.append(SourceImage(find_image(image_dir, label_path.stem, ".png"), label_path.stem, boxes, labels))
    if not sources:
        raise FileNotFoundError(f"no label files in {label_dir}")
    return sources
