#!/usr/bin/env python
"""Train a peer detector (YOLO11n, Deformable-DETR) on the images our models see, for a fixed
training time, and score it with our evaluator (benchmarks only: ``pip install --no-build-isolation -e ".[benchmark]"``).

    python tools/train_peer.py --peer yolo11n --config-file configs/quick_schedules/dino_tiny_synthetic.yaml \\
        --seed 0 --budget-seconds 600 --output-dir output/peers/yolo11n_s0
    python tools/train_peer.py --peer deformable_detr --config-file C --seed 0 --budget-seconds 600 --output-dir D

The config says what the comparison is about, so that the peer and our model see the same thing:
DATASETS.TRAIN / TEST, MODEL.SDCONET.NUM_CLASSES, SOLVER.IMS_PER_BATCH and the degradation
(MODEL.SDCONET.DEGRADE: the HR tiles are shrunk as our model shrinks them, then rounded to 8 bits,
because both peers read 8-bit images). Boxes are predicted on the LR image, scaled back to the HR
tile and scored by the same COCO evaluator as ``train_net.py`` (TEST.SDCONET.PROTOCOL, the tiny
bands), so the numbers sit in one table with ours (``tools/compare.py --peer``).

Writes OUTPUT_DIR/final_metrics.json ({"bbox": {...}} as train_net.py), OUTPUT_DIR/metrics.json
(one line with ``train_seconds``) and OUTPUT_DIR/log.txt. ``--peer`` also takes ``module:Class``
for a peer of your own (the contract is in ``sdconet/peers/__init__.py``).
"""
import argparse
import importlib
import json
import logging
import os
import sys
import time

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.logger import setup_logger

from sdconet import get_sdconet_cfg
from sdconet.data.image_io import read_image_any, read_options
from sdconet.engine.trainer import Trainer
from sdconet.modeling.degradation import Degradation, build_degradation
from sdconet.peers import PEERS, peer_class

logger = logging.getLogger("sdconet.train_peer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--peer", required=True, help=f"one of {sorted(PEERS)}, or module:Class")
    parser.add_argument("--config-file", required=True, help="our config whose data and degradation the peer uses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-seconds", type=float, required=True, help="training time of the peer")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1") or 1),
                        help="torch threads (default: $OMP_NUM_THREADS, else 1)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of the config")
    args = parser.parse_args(argv)
    if args.budget_seconds <= 0:
        parser.error(f"--budget-seconds must be > 0, got {args.budget_seconds:g}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def load_peer(name: str):
    """A registered peer's class, or ``module:Class``."""
    if name in PEERS or ":" not in name:
        return peer_class(name)
    module, cls = name.split(":", 1)
    return getattr(importlib.import_module(module), cls)


def degradation_of(cfg) -> Degradation:
    """The model's degradation, on 0-255 pixels (noise std is in pixel units there already)."""
    return build_degradation(cfg, pixel_std=(1.0, 1.0, 1.0))


def lr_image(hr: np.ndarray, degradation: Degradation) -> np.ndarray:
    """HR uint8 RGB (H, W, 3) -> the LR input as uint8 RGB (H/s, W/s, 3), rounded and clipped."""
    x = torch.from_numpy(np.ascontiguousarray(hr)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        lr = degradation(x)[0]
    return lr.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def lr_targets(record: dict, scale: int) -> dict:
    """The record's boxes in LR pixels (XYXY, clipped to the image) and contiguous class ids; crowd
    boxes and boxes with no area after clipping are left out."""
    boxes, classes = [], []
    for obj in record.get("annotations", []):
        if obj.get("iscrowd", 0):
            continue
        boxes.append(BoxMode.convert(list(obj["bbox"]), obj["bbox_mode"], BoxMode.XYXY_ABS))
        classes.append(obj["category_id"])
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / scale
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, record["width"] / scale)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, record["height"] / scale)
    keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    return {"boxes": boxes[keep], "classes": np.asarray(classes, dtype=np.int64)[keep]}


def load_split(cfg, dataset: str, degradation: Degradation):
    """The dataset's records and their LR images."""
    records = DatasetCatalog.get(dataset)
    options = read_options(cfg)
    images = [lr_image(read_image_any(r["file_name"], "RGB", **options), degradation) for r in records]
    return records, images


def to_instances(prediction: dict, record: dict, scale: int) -> Instances:
    """A peer's LR prediction as detectron2 Instances on the HR tile (what the evaluator scores)."""
    instances = Instances((record["height"], record["width"]))
    boxes = torch.as_tensor(np.asarray(prediction["boxes"], dtype=np.float32).reshape(-1, 4)) * scale
    instances.pred_boxes = Boxes(boxes)
    instances.scores = torch.as_tensor(np.asarray(prediction["scores"], dtype=np.float32))
    instances.pred_classes = torch.as_tensor(np.asarray(prediction["classes"], dtype=np.int64))
    return instances


def evaluate(cfg, dataset: str, records, predictions, scale: int, output_dir: str) -> dict:
    """Our evaluator (the tiny bands, the configured protocol) over the peer's predictions."""
    evaluator = Trainer.build_evaluator(cfg, dataset, os.path.join(output_dir, "inference", dataset))
    evaluator.reset()
    for record, prediction in zip(records, predictions):
        evaluator.process([record], [{"instances": to_instances(prediction, record, scale)}])
    return evaluator.evaluate()


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logger(args.output_dir, name="sdconet")
    setup_logger(args.output_dir, name="detectron2")
    cfg = get_sdconet_cfg(args.config_file, [*args.opts, "TEST.SDCONET.SR_QUALITY", False], cpu_fallback=True)
    if len(cfg.DATASETS.TEST) != 1 or len(cfg.DATASETS.TRAIN) != 1:
        raise ValueError(f"train_peer.py takes one DATASETS.TRAIN and one DATASETS.TEST, got "
                         f"{tuple(cfg.DATASETS.TRAIN)} and {tuple(cfg.DATASETS.TEST)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    scale = int(cfg.MODEL.SDCONET.DEGRADE.SCALE)
    degradation = degradation_of(cfg)
    train_records, train_images = load_split(cfg, cfg.DATASETS.TRAIN[0], degradation)
    targets = [lr_targets(r, scale) for r in train_records]
    logger.info(f"peer {args.peer}: {len(train_images)} LR training images of {train_images[0].shape[:2]}, "
                f"{sum(len(t['classes']) for t in targets)} boxes, budget {args.budget_seconds:g} s, "
                f"{args.threads} threads, seed {args.seed}")
    peer = load_peer(args.peer)(num_classes=cfg.MODEL.SDCONET.NUM_CLASSES, seed=args.seed,
                                work_dir=os.path.join(args.output_dir, "peer"), threads=args.threads,
                                batch_size=cfg.SOLVER.IMS_PER_BATCH)
    start = time.perf_counter()
    info = peer.train(train_images, targets, args.budget_seconds)
    info = {"wall_seconds_train_call": time.perf_counter() - start, **info}
    logger.info(f"peer {args.peer} trained: {info}")
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        f.write(json.dumps({"iteration": int(info.get("iterations", info.get("epochs", 0))), **info}) + "\n")
    test_name = cfg.DATASETS.TEST[0]
    test_records, test_images = load_split(cfg, test_name, degradation)
    start = time.perf_counter()
    predictions = peer.predict(test_images)
    logger.info(f"peer {args.peer}: predicted {len(test_images)} test images in {time.perf_counter() - start:.1f} s")
    results = evaluate(cfg, test_name, test_records, predictions, scale, args.output_dir)
    with open(os.path.join(args.output_dir, "final_metrics.json"), "w") as f:
        json.dump({**results, "peer": {"name": args.peer, **info}}, f, indent=2)
    bbox = results.get("bbox", {})
    keys = ("AP", "AP50", "AP75", "APs", "AP_vt", "AP_t", "AP_s_tod")
    print(f"[final] {args.peer} " + "  ".join(f"{k}={bbox[k]:.2f}" for k in keys if k in bbox), flush=True)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
