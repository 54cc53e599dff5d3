"""Built-in synthetic remote-sensing dataset ("Synthetic_RS"), so SDCoNet runs with no download:
the dataset files (PNG tiles + COCO json per split) and their summary.

A tile is a seeded aerial scene (``synthetic_scene.render_tile``) holding small objects of four
classes (``SYNTHETIC_RS_CLASSES``, drawn by ``synthetic_shapes``). The GT box of an object is
the tight horizontal box of its drawn parts, clipped to the tile, in COCO pixel coordinates.
The same seed gives the same bytes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2

from .metadata import SIZE_BANDS, SYNTHETIC_RS_CLASSES, size_band
from .synthetic_scene import MAX_OBJECTS_PER_TILE, render_tile

DATASET_DIRNAME = "Synthetic_RS"
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # fast; sensor noise leaves little to compress anyway
BOX_DECIMALS = 2


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


__all__ = ["DATASET_DIRNAME", "MAX_OBJECTS_PER_TILE", "format_summary", "generate_split",
           "generate_synthetic_dataset", "render_tile", "summarize_coco", "synthetic_split_paths"]
