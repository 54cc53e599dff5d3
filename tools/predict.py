#!/usr/bin/env python
"""Detect objects in images or large scenes (files, folders, globs) with a trained SDCoNet.

Writes to --output:
  results.json            COCO results (one entry per box: file_name, image_id, category_id, bbox xywh, score)
  <name>.png              the detections drawn (on a downscaled copy for scenes larger than --draw-max-side)
  <name>.geojson          box polygons: map coordinates + "crs" for georeferenced GeoTIFFs, pixels otherwise

Without --degrade the images are taken as the real low-quality input (MODEL.SDCONET.DEGRADE.TEST False,
TEST.SDCONET.SR_QUALITY False); with it they are treated as HR and degraded inside the model (the
benchmark protocol). Files are read as in training: TIFF / GeoTIFF with rasterio, the bands and
12/16-bit scaling of INPUT.SDCONET.BANDS / SCALING / PERCENTILES / MAX_VALUE (set them with --opts).

An unreadable file is skipped with an error line and the others are still written; the run then
exits with status 1, listing the skipped files (--strict stops at the first one instead).

Example:
  python tools/predict.py --config-file configs/quick_schedules/dino_tiny_synthetic.yaml \
      --weights output/demo/model_final.pth scenes/ --output output/predictions --score-thresh 0.3 \
      --opts MODEL.SDCONET.TRANSFORMER.NUM_DETECTIONS 100
"""
import argparse
import glob
import json
import math
import os
import sys

import cv2
import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

import sdconet  # registers the model and datasets
from sdconet.inference import Predictor
from sdconet.inference.geo import detections_to_geojson, read_georeference

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".jp2")


def integer(low):
    """argparse type: an integer >= ``low`` (argparse names the flag in the error)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def fraction(text):
    """argparse type: a number in [0, 1] (nan and inf rejected: they would silently drop every box)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default="", help="checkpoint; empty = untrained weights (smoke tests)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--output", default="output/predictions")
    parser.add_argument("--tile", type=integer(1), default=512, help="tile side in pixels")
    parser.add_argument("--overlap", type=integer(0), default=128,
                        help="pixels, less than --tile; choose more than the largest object")
    parser.add_argument("--batch", type=integer(1), default=4, help="tiles per forward pass")
    parser.add_argument("--score-thresh", type=fraction, default=0.3, help="in [0, 1]")
    parser.add_argument("--nms-iou", type=fraction, default=0.5, help="IoU of the merge NMS, in [0, 1]")
    parser.add_argument("--degrade", action="store_true", help="degrade the images x s inside the model (benchmark)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--draw-max-side", type=integer(1), default=2048, help="larger scenes are drawn downscaled")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable file (default: skip it)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides KEY VALUE ... (last on the command line)")
    args = parser.parse_args(argv)
    if args.overlap >= args.tile:
        parser.error(f"argument --overlap: must be smaller than --tile ({args.tile}), got {args.overlap}")
    return args


def expand_inputs(inputs):
    """Image files named by files, folders (not recursive) and glob patterns, sorted, without repeats.

    Only files with an image extension count (a shell-expanded ``scene/*`` also names GeoTIFF
    sidecars such as .tfw or .aux.xml).
    """
    files = []
    for item in inputs:
        if os.path.isdir(item):
            candidates = sorted(os.path.join(item, f) for f in os.listdir(item))
        elif os.path.isfile(item):
            candidates = [item]
        else:
            candidates = sorted(glob.glob(item))
            if not candidates:
                what = "no file matches the pattern" if glob.has_magic(item) else "no such file or folder"
                raise FileNotFoundError(f"{what}: {item}")
        files += [f for f in candidates if os.path.isfile(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
    return list(dict.fromkeys(files))


def class_names(cfg):
    for name in cfg.DATASETS.TEST:
        names = MetadataCatalog.get(name).get("thing_classes", None)
        if names:
            return list(names)
    return [f"class_{i}" for i in range(cfg.MODEL.SDCONET.NUM_CLASSES)]


def draw(image_bgr, instances, names, max_side):
    """The detections drawn with detectron2's Visualizer on a copy at most ``max_side`` pixels wide/high."""
    h, w = image_bgr.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = cv2.resize(image_bgr, (max(1, round(w * scale)), max(1, round(h * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else image_bgr
    viz = Visualizer(small[:, :, ::-1], metadata=None, scale=1.0)
    boxes = instances.pred_boxes.tensor.numpy() * scale
    labels = [f"{names[c] if c < len(names) else c} {s:.2f}"
              for c, s in zip(instances.pred_classes.tolist(), instances.scores.tolist())]
    out = viz.overlay_instances(boxes=boxes, labels=labels) if len(boxes) else viz.output
    return out.get_image()[:, :, ::-1]


def write_results(output, results):
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(results, f)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(args.config_file):
        sys.exit(f"predict.py: error: no such config file: {args.config_file}")
    try:
        files = expand_inputs(args.inputs)
    except FileNotFoundError as e:
        sys.exit(f"predict.py: error: {e}")
    if not files:
        sys.exit(f"predict.py: error: no image ({' '.join(IMAGE_EXTENSIONS)}) found in {' '.join(args.inputs)}")
    # Without --degrade the images are the real low-quality input (as train_net.py --lr-input).
    opts = list(args.opts) + (["MODEL.SDCONET.DEGRADE.TEST", True] if args.degrade else sdconet.lr_input_opts())
    predictor = Predictor(args.config_file, args.weights, device=args.device, opts=opts,
                          score_thresh=args.score_thresh)
    names = class_names(predictor.cfg)
    os.makedirs(args.output, exist_ok=True)
    results, skipped = [], []
    stems = {}
    for image_id, path in enumerate(tqdm(files, desc="images", unit="image")):
        try:
            image = predictor.read_image(path)  # the configured bands / scaling, as in training
        except OSError as e:
            if args.strict:
                write_results(args.output, results)
                sys.exit(f"predict.py: error: {e} (stopped by --strict; results of the {image_id} file(s) "
                         f"before it written to {args.output})")
            tqdm.write(f"predict.py: skipping unreadable file: {e}", file=sys.stderr)
            skipped.append(path)
            continue
        inst = predictor.predict_large(image, tile=args.tile, overlap=args.overlap, batch=args.batch,
                                       nms_iou=args.nms_iou, progress=True)
        boxes = inst.pred_boxes.tensor.numpy().astype(np.float64)
        scores, classes = inst.scores.numpy(), inst.pred_classes.numpy()
        for (x0, y0, x1, y1), score, cls in zip(boxes, scores, classes):
            results.append({"file_name": path, "image_id": image_id, "category_id": int(cls) + 1,
                            "category": names[int(cls)] if int(cls) < len(names) else str(int(cls)),
                            "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                            "score": round(float(score), 5)})
        stem = os.path.splitext(os.path.basename(path))[0]
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:  # same file name in two folders
            stem = f"{stem}_{stems[stem]}"
        cv2.imwrite(os.path.join(args.output, stem + ".png"), draw(image, inst, names, args.draw_max_side))
        geo = read_georeference(path)
        transform, crs = geo if geo is not None else (None, None)
        collection = detections_to_geojson(boxes, scores, classes, names, transform, crs, image_file=path)
        with open(os.path.join(args.output, stem + ".geojson"), "w") as f:
            json.dump(collection, f)
        del image
    write_results(args.output, results)
    print(f"{len(results)} detections in {len(files) - len(skipped)} image(s) written to {args.output}")
    if skipped:
        sys.exit(f"predict.py: error: {len(skipped)} of {len(files)} file(s) skipped as unreadable:\n  "
                 + "\n  ".join(skipped))


if __name__ == "__main__":
    main()
