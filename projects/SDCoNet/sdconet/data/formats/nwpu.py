"""Parsers of the two public NWPU VHR-10 releases.

Original release (Cheng et al.)::

    positive image set/001.jpg ...      650 images with objects
    negative image set/001.jpg ...      150 images without objects (names overlap the positives)
    ground truth/001.txt ...            one object per line: (x1,y1),(x2,y2),c   c = 1..10

COCO re-release (github.com/chaozhong2010/VHR-10_dataset_coco)::

    annotations.json                    COCO json, categories 1..10 ("storage_tank", ...)
    positive image set/001.jpg ...

Neither has an official train/test split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..metadata import NWPU_VHR10_CLASSES
from .tiling import SourceImage
from .voc import ClassNameMatcher

POSITIVE_DIR = "positive image set"
NEGATIVE_DIR = "negative image set"
GROUND_TRUTH_DIR = "ground truth"
NEGATIVE_PREFIX = "negative_"  # negatives reuse the positives' file names

_LINE = re.compile(r"^\(\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\)\s*,\s*\(\s*([-\d.]+)\s*,\s*([-\d.]+)\s*\)\s*,\s*(\d+)\s*$")


def parse_ground_truth_txt(path: Path, num_classes: int = len(NWPU_VHR10_CLASSES)):
    """Boxes (xyxy, float pixels) and 0-based labels of one ``ground truth/*.txt`` file."""
    path = Path(path)
    boxes, labels = [], []
    for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        match = _LINE.match(line.strip())
        if match is None:
            raise ValueError(f"{path}:{line_no}: expected '(x1,y1),(x2,y2),c', got {line.strip()!r}")
        x1, y1, x2, y2 = (float(v) for v in match.groups()[:4])
        cls = int(match.group(5))
        if not 1 <= cls <= num_classes:
            raise ValueError(f"{path}:{line_no}: class {cls} outside 1..{num_classes}")
        boxes.append([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)])
        labels.append(cls - 1)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".bmp"))


def load_original_release(src: Path, include_negatives: bool = True) -> List[SourceImage]:
    """Sources of the original release; negatives get the stem prefix ``negative_``."""
    src = Path(src)
    positive_dir, gt_dir = src / POSITIVE_DIR, src / GROUND_TRUTH_DIR
    for folder in (positive_dir, gt_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"NWPU VHR-10 folder not found: {folder}")
    sources = []
    for image_path in _images_in(positive_dir):
        gt_path = gt_dir / f"{image_path.stem}.txt"
        if not gt_path.is_file():
            raise FileNotFoundError(f"ground-truth file not found for {image_path}: {gt_path}")
        boxes, labels = parse_ground_truth_txt(gt_path)
        sources.append(SourceImage(image_path, image_path.stem, boxes, labels))
    negative_dir = src / NEGATIVE_DIR
    if include_negatives and negative_dir.is_dir():
        sources += [SourceImage(p, NEGATIVE_PREFIX + p.stem) for p in _images_in(negative_dir)]
    return sources


def load_coco_release(json_path: Path, image_dir: Path,
                      class_names: Sequence[str] = NWPU_VHR10_CLASSES) -> List[SourceImage]:
    """Sources of a COCO json + image folder (category names matched tolerant to spelling)."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    with open(json_path, encoding="utf-8") as f:
        coco = json.load(f)
    matcher = ClassNameMatcher(class_names)
    label_of_category = {c["id"]: matcher(c["name"], json_path) for c in coco["categories"]}
    by_image = {img["id"]: ([], []) for img in coco["images"]}
    for ann in coco["annotations"]:
        if ann["image_id"] not in by_image:
            raise ValueError(f"{json_path}: annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes, labels = by_image[ann["image_id"]]
        boxes.append([x, y, x + w, y + h])
        labels.append(label_of_category[ann["category_id"]])
    sources = []
    for img in sorted(coco["images"], key=lambda i: i["file_name"]):
        boxes, labels = by_image[img["id"]]
        sources.append(SourceImage(image_dir / img["file_name"], Path(img["file_name"]).stem, boxes, labels))
    return sources


def find_coco_json(src: Path) -> Optional[Path]:
    """``annotations.json`` of the COCO re-release, else the only json directly in ``src``."""
    src = Path(src)
    if (src / "annotations.json").is_file():
        return src / "annotations.json"
    candidates = sorted(src.glob("*.json"))
    return candidates[0] if len(candidates) == 1 else None


def load_nwpu_sources(src: Path, coco_json: Optional[Path] = None, image_dir: Optional[Path] = None,
                      include_negatives: bool = True) -> List[SourceImage]:
    """Detect the release in ``src``: ``ground truth/`` means original, a json means COCO."""
    src = Path(src)
    if coco_json is None and (src / GROUND_TRUTH_DIR).is_dir():
        return load_original_release(src, include_negatives)
    coco_json = Path(coco_json) if coco_json is not None else find_coco_json(src)
    if coco_json is None:
        raise FileNotFoundError(
            f"{src}: neither '{GROUND_TRUTH_DIR}/' (original release) nor a COCO json (re-release) found")
    sources = load_coco_release(coco_json, image_dir if image_dir is not None else src / POSITIVE_DIR)
    negative_dir = src / NEGATIVE_DIR
    if include_negatives and negative_dir.is_dir():
        sources += [SourceImage(p, NEGATIVE_PREFIX + p.stem) for p in _images_in(negative_dir)]
    return sources
