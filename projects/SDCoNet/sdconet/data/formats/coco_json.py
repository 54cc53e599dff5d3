"""Build and write COCO detection json, and print a dataset summary.

Category ids are 1..N in the order of the class list (see ``sdconet.data.metadata``), so
detectron2's ``load_coco_json`` maps them onto ``thing_classes`` in the same order.
Output is deterministic: images sorted by file name, ids assigned in that order.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from ..metadata import SIZE_BANDS, size_band


class CocoJsonWriter:
    """Collects images with their xyxy boxes and 0-based class ids; emits a COCO dict."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self._images: Dict[str, dict] = {}

    def add_image(self, file_name: str, width: int, height: int, boxes_xyxy, class_ids) -> None:
        if file_name in self._images:
            raise ValueError(f"image {file_name!r} added twice")
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        class_ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        if len(boxes) != len(class_ids):
            raise ValueError(f"{file_name}: {len(boxes)} boxes but {len(class_ids)} class ids")
        bad = (class_ids < 0) | (class_ids >= len(self.class_names))
        if bad.any():
            raise ValueError(f"{file_name}: class id {int(class_ids[bad][0])} "
                             f"outside 0..{len(self.class_names) - 1}")
        self._images[file_name] = dict(width=int(width), height=int(height), boxes=boxes, class_ids=class_ids)

    def to_dict(self) -> dict:
        images, annotations = [], []
        for image_id, file_name in enumerate(sorted(self._images), start=1):
            entry = self._images[file_name]
            images.append(dict(id=image_id, file_name=file_name, width=entry["width"], height=entry["height"]))
            # Stable order inside an image: by category, then position.
            order = sorted(range(len(entry["boxes"])),
                           key=lambda i: (int(entry["class_ids"][i]), *entry["boxes"][i].tolist()))
            for i in order:
                x1, y1, x2, y2 = (round(float(v), 3) for v in entry["boxes"][i])
                w, h = round(x2 - x1, 3), round(y2 - y1, 3)
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=image_id,
                    category_id=int(entry["class_ids"][i]) + 1,
                    bbox=[x1, y1, w, h], area=round(w * h, 3), iscrowd=0,
                ))
        categories = [dict(id=i + 1, name=name, supercategory="object") for i, name in enumerate(self.class_names)]
        return dict(images=images, annotations=annotations, categories=categories)

    def write(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, sort_keys=True, separators=(",", ":"))
        return path


def summarize(coco: dict, class_names: Sequence[str]) -> dict:
    """Counts of a COCO dict: images, objects per class, objects per size band."""
    per_class = Counter()
    per_band = Counter()
    names_by_id = {c["id"]: c["name"] for c in coco["categories"]}
    for ann in coco["annotations"]:
        per_class[names_by_id[ann["category_id"]]] += 1
        per_band[size_band(ann["bbox"][2], ann["bbox"][3])] += 1
    return dict(
        images=len(coco["images"]),
        empty_images=len(coco["images"]) - len({a["image_id"] for a in coco["annotations"]}),
        objects=len(coco["annotations"]),
        per_class={name: per_class[name] for name in class_names},
        per_size_band={name: per_band[name] for _, _, name in SIZE_BANDS},
    )


def format_summary(coco: dict, class_names: Sequence[str], title: str = "") -> str:
    stats = summarize(coco, class_names)
    width = max(len(n) for n in list(class_names) + ["size (sqrt area)"])
    lines: List[str] = []
    if title:
        lines.append(f"== {title} ==")
    lines.append(f"images: {stats['images']} ({stats['empty_images']} without objects), "
                 f"objects: {stats['objects']}")
    lines.append("objects per class:")
    lines += [f"  {name:<{width}} {count:>8}" for name, count in stats["per_class"].items()]
    lines.append("objects per size band (sqrt(w*h), px):")
    lines += [f"  {name:<{width}} {count:>8}" for name, count in stats["per_size_band"].items()]
    return "\n".join(lines)


def print_summary(coco: dict, class_names: Sequence[str], title: str = "") -> None:
    print(format_summary(coco, class_names, title), flush=True)
