#!/usr/bin/env python
"""Draw ground-truth boxes on HR images and on their degraded LR versions, as PNGs.

Checks a registered dataset before training: are boxes where the objects are, and what
does the model actually see after the benchmark degradation?

    python tools/visualize_data.py --dataset synthetic_rs_train --num 8 --out output/data_samples
    python tools/visualize_data.py --dataset nwpu_vhr10_split_test --config-file configs/Base-SDCoNet.yaml
"""
import argparse
import os

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.visualizer import Visualizer

from sdconet import get_sdconet_cfg
from sdconet.data.image_io import read_image_any, read_options
from sdconet.modeling.degradation import Degradation, build_degradation


def degrade_image(image_bgr: np.ndarray, degradation: Degradation, mean, std) -> np.ndarray:
    """Run the model's degradation on one uint8 BGR image, return uint8 BGR LR image."""
    s = degradation.scale
    h, w = image_bgr.shape[:2]
    pad = np.zeros((h + (-h) % s, w + (-w) % s, 3), np.uint8)
    pad[:h, :w] = image_bgr
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (torch.from_numpy(pad).permute(2, 0, 1)[None].float() - mean) / std
    with torch.no_grad():
        lr = degradation(x) * std + mean
    lr = lr[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    return lr[: -(-h // s), : -(-w // s)]


def draw(image_bgr, boxes_xyxy, labels, metadata, scale=1.0):
    vis = Visualizer(image_bgr[:, :, ::-1], metadata=metadata, scale=scale)
    names = [metadata.thing_classes[c] for c in labels]
    out = vis.overlay_instances(boxes=np.asarray(boxes_xyxy).reshape(-1, 4), labels=names)
    return out.get_image()[:, :, ::-1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="registered dataset name, e.g. synthetic_rs_train")
    parser.add_argument("--num", type=int, default=8, help="number of samples to draw")
    parser.add_argument("--out", default="output/data_samples", help="output folder for PNGs")
    parser.add_argument("--config-file", default="", help="take the degradation and pixel stats from this config")
    parser.add_argument("--lr-zoom", type=float, default=0.0,
                        help="draw the LR image enlarged by this factor (default: the degradation scale, "
                             "so both pictures have the same size)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    cfg = get_sdconet_cfg(args.config_file, args.opts)
    degradation = build_degradation(cfg)
    metadata = MetadataCatalog.get(args.dataset)
    dicts = DatasetCatalog.get(args.dataset)
    os.makedirs(args.out, exist_ok=True)
    zoom = args.lr_zoom or degradation.scale
    written = []
    for record in dicts[: args.num]:
        image = read_image_any(record["file_name"], **read_options(cfg))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record.get("annotations", [])]
        labels = [a["category_id"] for a in record.get("annotations", [])]
        lr = degrade_image(image, degradation, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)
        lr_boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / degradation.scale
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        for suffix, picture in (("hr", draw(image, boxes, labels, metadata)),
                                ("lr", draw(lr, lr_boxes, labels, metadata, scale=zoom))):
            path = os.path.join(args.out, f"{stem}_{suffix}.png")
            cv2.imwrite(path, picture)
            written.append(path)
    print(f"wrote {len(written)} PNGs for {min(args.num, len(dicts))} samples of {args.dataset} to {args.out}")
    return written


if __name__ == "__main__":
    main()
