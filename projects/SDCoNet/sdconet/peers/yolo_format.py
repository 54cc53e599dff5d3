"""Our boxes <-> the YOLO label format, and a YOLO dataset folder on disk for the Ultralytics peer.

A YOLO label file has one line ``cls cx cy w h`` per object, centre and size normalised by the image
width and height. Pure numpy / torchvision / PIL, so the conversion is tested without ``ultralytics``.
"""
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torchvision.ops import box_convert

# 6 decimals of a normalised coordinate are 1e-6 x the image side: < 1e-3 px up to 1000-px images.
DECIMALS = 6


def to_yolo_lines(boxes_xyxy, classes, width: int, height: int) -> list:
    """``cls cx cy w h`` lines for XYXY pixel boxes of a ``width`` x ``height`` image.

    Boxes are clipped to the image first and those left without area are dropped: Ultralytics
    rejects an image whose labels fall outside [0, 1] and a zero-size box has nothing to learn.
    """
    boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4))
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if len(boxes) != len(classes):
        raise ValueError(f"{len(boxes)} boxes but {len(classes)} classes")
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).numpy()
    norm = box_convert(boxes[keep], "xyxy", "cxcywh") / torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return [f"{c} " + " ".join(f"{v:.{DECIMALS}f}" for v in row) for c, row in zip(classes[keep], norm.tolist())]


def from_yolo_lines(lines, width: int, height: int):
    """``(boxes, classes)`` from ``cls cx cy w h`` lines: float32 N x 4 XYXY pixels and int64 N.
    Blank lines are skipped (a file may end with a newline)."""
    rows = [line.split() for line in lines if line.strip()]
    if any(len(r) != 5 for r in rows):
        raise ValueError(f"a YOLO detection line has 5 fields 'cls cx cy w h': {next(r for r in rows if len(r) != 5)}")
    values = torch.tensor([[float(v) for v in r[1:]] for r in rows], dtype=torch.float64).reshape(-1, 4)
    boxes = box_convert(values * torch.tensor([width, height, width, height], dtype=values.dtype), "cxcywh", "xyxy")
    return boxes.numpy().astype(np.float32), np.array([int(r[0]) for r in rows], dtype=np.int64)


def write_yolo_dataset(root, split: str, images, targets, names) -> Path:
    """Write ``root/images/<split>/<i>.png`` (uint8 RGB arrays) with ``root/labels/<split>/<i>.txt``
    (``targets``: dicts of ``boxes`` XYXY pixels and ``classes``; an image without objects gets an
    empty file, which Ultralytics reads as background), and ``root/data.yaml``; returns its path.

    A split written before is removed first, so no stale image of a larger earlier set survives.
    ``data.yaml`` names ``images/val`` as the val set when that split exists, else ``images/train``:
    Ultralytics requires a val entry even when it never validates.
    """
    root = Path(root)
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    for stale in (image_dir, label_dir):
        shutil.rmtree(stale, ignore_errors=True)
    (root / "labels" / f"{split}.cache").unlink(missing_ok=True)  # Ultralytics' label cache of that split
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for i, (image, target) in enumerate(zip(images, targets)):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {i}: expected uint8 H x W x 3 RGB, got {image.dtype} {image.shape}")
        Image.fromarray(image, "RGB").save(image_dir / f"{i:06d}.png")
        lines = to_yolo_lines(target["boxes"], target["classes"], image.shape[1], image.shape[0])
        (label_dir / f"{i:06d}.txt").write_text("".join(f"{line}\n" for line in lines))
    val = "images/val" if (root / "images" / "val").is_dir() else "images/train"
    data = {"path": str(root.resolve()), "train": "images/train", "val": val,
            "names": {i: str(n) for i, n in enumerate(names)}}
    with open(root / "data.yaml", "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return root / "data.yaml"
