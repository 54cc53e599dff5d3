#!/usr/bin/env python
"""Pictures of what a trained SDCoNet sees and predicts, one PNG per dataset image.

Subcommands:
  predictions  GT (green) and predictions above --score (red, "class score") on the LR input the model
               saw (enlarged x scale with nearest, so its pixels show) and on the HR image, side by side.
  features     Swin backbone heat-maps per stage (stage1..4 = stage1_raw, res3, res4, res5) overlaid on the
               HR image, for one or two checkpoints: a grid with one row per checkpoint, one column per stage.
               Heat-map = channel-wise mean of |activation| (--reduce l2: L2 norm over channels), min-max
               normalised per map, on the part of the map that covers the image.
  saliency     per-level saliency probabilities (neck levels fine -> coarse) over the image; needs
               MODEL.SDCONET.SALIENCY.ENABLED. Not renormalised: colour = probability (0 blue .. 1 red).
  sr           the LR input (enlarged, nearest), its bicubic upsampling, the SR output, the residual SR - bicubic
               (x --residual-gain around grey) and HR: full images (top) and a zoomed crop around the largest
               GT object (bottom); PSNR (Y channel, images rounded to 8 bits, as SRQualityEvaluator) of bicubic
               and SR, full image and crop, in the titles. Needs MODEL.SDCONET.SR.ENABLED.

Every panel has a TITLE_HEIGHT-pixel title bar; panels have the HR image size (sr crops: W x W).

Examples:
  python tools/visualize.py predictions --config-file configs/quick_schedules/dino_tiny_synthetic.yaml \
      --weights output/dino_tiny_synthetic/model_final.pth --num 8 --score 0.3 --out output/vis
  python tools/visualize.py features --config-file configs/quick_schedules/dino_tiny_synthetic.yaml \
      --weights output/dino_tiny_synthetic/model_final.pth --label DINO \
      --config-file2 configs/quick_schedules/sdconet_tiny_synthetic.yaml \
      --weights2 output/sdconet_tiny_synthetic/model_final.pth --label2 SDCoNet
--opts KEY VALUE ... (config overrides, applied to every config) must come last.
"""
import argparse
import logging
import os
from typing import Dict, List, NamedTuple, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.visualizer import Visualizer

from sdconet import get_sdconet_cfg  # importing sdconet registers the model and datasets
from sdconet.data.image_io import read_image_any, read_options
from sdconet.evaluation.sr_quality import psnr_y
from sdconet.inference import Predictor

logger = logging.getLogger("sdconet.visualize")

TITLE_HEIGHT = 24
# Display name -> backbone output key. Stage 1 is the raw stage output: "res2" exists only when the
# config lists it in SWIN.OUT_FEATURES, "stage1_raw" always does.
STAGES = (("stage1", "stage1_raw"), ("stage2", "res3"), ("stage3", "res4"), ("stage4", "res5"))
GT_COLOR = (0.0, 0.85, 0.0)  # RGB in [0, 1], as detectron2's Visualizer takes them
PRED_COLOR = (1.0, 0.0, 0.0)
CROP_BOX_COLOR = (0, 255, 255)  # BGR, the zoom window drawn on the full sr images


class ConfigError(ValueError):
    """The config cannot give the asked-for picture (e.g. no SR branch for ``sr``)."""


class ModelRun(NamedTuple):
    """One eval forward: the model's output dict, the LR input it saw and its backbone features."""

    outputs: dict
    lr: np.ndarray  # (h, w, 3) uint8 BGR, the degraded input cropped to the image
    features: Dict[str, torch.Tensor]  # name -> (C, h_f, w_f), cropped to the part covering the image
    scale: int  # HR / LR size ratio the model used


# ---------------------------------------------------------------------------------------------- model
def load_model(config_file: str, weights: str, opts: Sequence[str] = (), device: Optional[str] = None):
    """(cfg, model in eval mode); empty ``weights`` keeps the random init (smoke tests) with a warning."""
    cfg = get_sdconet_cfg(config_file, opts)
    if not weights:
        logger.warning(f"no weights given for {config_file}: drawing a randomly initialised model")
    predictor = Predictor(cfg, weights or None, device=device)
    return predictor.cfg, predictor.model


def pixels_to_bgr(chw: torch.Tensor, input_format: str) -> np.ndarray:
    """(3, H, W) 0-255 float in the model's channel order -> (H, W, 3) uint8 BGR."""
    image = chw.detach().float().round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(image[:, :, ::-1] if input_format == "RGB" else image)


@torch.no_grad()
def run_model(model, image_bgr: np.ndarray, input_format: str = "BGR") -> ModelRun:
    """One eval forward on an HR image; a hook on the backbone keeps its LR input and its features."""
    captured = {}

    def keep_backbone_io(module, inputs, outputs):
        captured["lr"], captured["features"] = inputs[0], outputs

    h, w = image_bgr.shape[:2]
    image = image_bgr[:, :, ::-1] if input_format == "RGB" else image_bgr
    batched = [{"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))), "height": h, "width": w}]
    handle = model.backbone.register_forward_hook(keep_backbone_io)
    try:
        outputs = model(batched)[0]
    finally:
        handle.remove()
    scale = model.input_scale
    lr_h, lr_w = -(-h // scale), -(-w // scale)
    lr_batch = captured["lr"]
    lr = pixels_to_bgr(model.to_pixels(lr_batch[0, :, :lr_h, :lr_w]), input_format)
    pad_h, pad_w = lr_batch.shape[-2:]
    features = {}
    for name, feat in captured["features"].items():  # keep the cells that cover the image, not the padding
        fh, fw = feat.shape[-2:]
        features[name] = feat[0, :, : -(-lr_h * fh // pad_h), : -(-lr_w * fw // pad_w)].float().cpu()
    return ModelRun(outputs, lr, features, scale)


def describe(cfg) -> str:
    """Short name of the model a config builds, for row labels."""
    s = cfg.MODEL.SDCONET
    if s.SR.ENABLED and s.SALIENCY.ENABLED:
        return "SDCoNet"
    if s.SR.ENABLED:
        return "DINO + SR branch"
    return "DINO + saliency" if s.SALIENCY.ENABLED else "DINO"


# ---------------------------------------------------------------------------------------------- data
def load_records(dataset: str, num: int) -> List[dict]:
    records = DatasetCatalog.get(dataset)[:num]
    if not records:
        raise ValueError(f"dataset {dataset!r} has no image")
    return records


def gt_boxes(record) -> np.ndarray:
    """(N, 4) XYXY_ABS ground-truth boxes of a dataset dict."""
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record.get("annotations", [])]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def gt_classes(record) -> List[int]:
    return [a["category_id"] for a in record.get("annotations", [])]


def class_names(dataset: str, num_classes: int) -> List[str]:
    names = MetadataCatalog.get(dataset).get("thing_classes", None)
    return list(names) if names else [f"class_{i}" for i in range(num_classes)]


def image_stem(record) -> str:
    return os.path.splitext(os.path.basename(record["file_name"]))[0]


# ---------------------------------------------------------------------------------------------- drawing
def titled(image: np.ndarray, title: str) -> np.ndarray:
    """``image`` under a black TITLE_HEIGHT-pixel bar holding ``title`` in white."""
    bar = np.zeros((TITLE_HEIGHT, image.shape[1], 3), np.uint8)
    cv2.putText(bar, title, (4, TITLE_HEIGHT - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([bar, image])


def enlarge_nearest(image: np.ndarray, factor: int, size) -> np.ndarray:
    """``image`` enlarged ``factor`` times with nearest neighbour, cut to ``size`` = (H, W)."""
    h, w = image.shape[:2]
    big = cv2.resize(image, (w * factor, h * factor), interpolation=cv2.INTER_NEAREST) if factor > 1 else image
    return np.ascontiguousarray(big[: size[0], : size[1]])


def draw_boxes(image_bgr, gt_xyxy, gt_labels, pred_xyxy, pred_labels) -> np.ndarray:
    """GT boxes in green and predicted boxes in red, with their labels, drawn by detectron2's Visualizer."""
    vis = Visualizer(image_bgr[:, :, ::-1], metadata=None, scale=1.0)
    for boxes, labels, color in ((gt_xyxy, gt_labels, GT_COLOR), (pred_xyxy, pred_labels, PRED_COLOR)):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes):
            vis.overlay_instances(boxes=boxes, labels=list(labels), assigned_colors=[color] * len(boxes))
    return np.ascontiguousarray(vis.output.get_image()[:, :, ::-1])


def feature_heatmap(feature: torch.Tensor, reduce: str = "mean_abs") -> np.ndarray:
    """(C, h, w) activation -> (h, w) float32 in [0, 1]: mean |a| (or L2 norm) over channels, min-max scaled."""
    if reduce == "mean_abs":
        heat = feature.abs().mean(0)
    elif reduce == "l2":
        heat = feature.norm(dim=0)
    else:
        raise ValueError(f"unknown reduction {reduce!r}: use 'mean_abs' or 'l2'")
    heat = heat.float().cpu().numpy()
    span = float(heat.max() - heat.min())
    return ((heat - heat.min()) / span if span > 0 else np.zeros_like(heat)).astype(np.float32)


def overlay_heatmap(image_bgr: np.ndarray, heat: np.ndarray, interpolation=cv2.INTER_LINEAR,
                    alpha: float = 0.5) -> np.ndarray:
    """A [0, 1] map resized to the image, coloured with the JET map and blended over it."""
    h, w = image_bgr.shape[:2]
    heat = cv2.resize(np.clip(heat, 0, 1).astype(np.float32), (w, h), interpolation=interpolation)
    colored = cv2.applyColorMap((heat * 255).round().astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(image_bgr, 1 - alpha, colored, alpha, 0)


def draw_predictions(image_bgr, run: ModelRun, record, names, score: float) -> np.ndarray:
    """[LR input enlarged | HR], each with GT and the predictions scoring at least ``score``."""
    h, w = image_bgr.shape[:2]
    instances = run.outputs["instances"].to("cpu")
    keep = instances.scores >= score
    pred_boxes = instances.pred_boxes.tensor[keep].numpy()
    pred_labels = [f"{names[c] if c < len(names) else c} {s:.2f}"
                   for c, s in zip(instances.pred_classes[keep].tolist(), instances.scores[keep].tolist())]
    boxes, classes = gt_boxes(record), gt_classes(record)
    gt_labels = [names[c] if c < len(names) else str(c) for c in classes]
    # The LR image enlarged x scale has the HR size, so HR boxes (= LR boxes x scale) fit it as they are.
    lr_big = enlarge_nearest(run.lr, run.scale, (h, w))
    lr_panel = titled(draw_boxes(lr_big, boxes, gt_labels, pred_boxes, pred_labels),
                      f"LR input 1/{run.scale} (nearest x{run.scale})")
    hr_panel = titled(draw_boxes(image_bgr, boxes, gt_labels, pred_boxes, pred_labels),
                      f"HR: {len(boxes)} GT, {len(pred_boxes)} pred >= {score:g}")
    return np.hstack([lr_panel, hr_panel])


def draw_features(image_bgr, rows, reduce: str = "mean_abs") -> np.ndarray:
    """Grid of stage heat-maps: one row per (label, features) pair, one column per Swin stage."""
    grid = []
    for label, features in rows:
        panels = []
        for stage, key in STAGES:
            if key not in features:
                raise ConfigError(f"backbone output has no {key!r} ({stage}): add it to MODEL.SDCONET.SWIN.OUT_FEATURES")
            feat = features[key]
            panels.append(titled(overlay_heatmap(image_bgr, feature_heatmap(feat, reduce)),
                                 f"{stage} ({key}) {feat.shape[1]}x{feat.shape[2]}"))
        grid.append(titled(np.hstack(panels), f"{label}   [{reduce} over channels, min-max per map]"))
    return np.vstack(grid)


def draw_saliency(image_bgr, maps: Sequence[torch.Tensor]) -> np.ndarray:
    """[image | one panel per saliency level], probabilities shown as they are (nearest: one cell = one token)."""
    panels = [titled(image_bgr, "image")]
    for level, prob in enumerate(maps):
        prob = prob.float().cpu().numpy()
        panels.append(titled(overlay_heatmap(image_bgr, prob, cv2.INTER_NEAREST),
                             f"level {level} {prob.shape[0]}x{prob.shape[1]} max {prob.max():.2f}"))
    return np.hstack(panels)


def zoom_window(boxes_xyxy: np.ndarray, size, crop: int):
    """(x0, y0, side) of a square window inside an image of ``size`` = (H, W), centred on the largest box
    (on the image centre when there is none)."""
    h, w = size
    side = min(crop, h, w)
    if len(boxes_xyxy):
        areas = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
        x0, y0, x1, y1 = boxes_xyxy[int(np.argmax(areas))]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    else:
        cx, cy = w / 2, h / 2
    left = int(np.clip(round(cx - side / 2), 0, w - side))
    top = int(np.clip(round(cy - side / 2), 0, h - side))
    return left, top, side


def bicubic_upsample(lr_bgr: np.ndarray, size) -> np.ndarray:
    """LR uint8 image -> ``size`` = (H, W) with torch's bicubic, as SRQualityEvaluator's baseline."""
    lr = torch.from_numpy(lr_bgr).permute(2, 0, 1)[None].double()
    up = F.interpolate(lr, size=tuple(size), mode="bicubic", align_corners=False)[0]
    return up.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def amplified_residual(sr_bgr: np.ndarray, bicubic_bgr: np.ndarray, gain: float) -> np.ndarray:
    """What the SR branch adds to bicubic, ``128 + gain * (SR - bicubic)`` per channel: grey = nothing
    added, bright / dark = detail added / removed."""
    residual = sr_bgr.astype(np.float32) - bicubic_bgr.astype(np.float32)
    return np.clip(128.0 + gain * residual, 0, 255).round().astype(np.uint8)


def draw_sr(image_bgr, lr_bgr, sr_bgr, bicubic_bgr, window, scale: int, gain: float = 8.0):
    """2x5 grid: [LR | bicubic | SR | residual | HR] full (top) and their zoom windows (bottom,
    W x W, nearest); LR is enlarged ``scale`` times with nearest so its pixels show, the residual
    is :func:`amplified_residual`. Titles give the PSNR of bicubic and SR, full image and crop.
    Returns (picture, {"sr": dB, "bicubic": dB}) with the full-image PSNRs."""
    h, w = image_bgr.shape[:2]
    left, top, side = window
    hr_crop = image_bgr[top: top + side, left: left + side]
    psnr = {"bicubic": psnr_y(bicubic_bgr, image_bgr), "sr": psnr_y(sr_bgr, image_bgr)}
    panels = (("LR", enlarge_nearest(lr_bgr, scale, (h, w))), ("bicubic", bicubic_bgr), ("SR", sr_bgr),
              (f"residual x{gain:g}", amplified_residual(sr_bgr, bicubic_bgr, gain)), ("HR", image_bgr))
    full, crops = [], []
    for name, image in panels:
        crop = image[top: top + side, left: left + side]
        db = crop_db = ""
        if name.lower() in psnr:
            db = f" PSNR {psnr[name.lower()]:.2f} dB"
            crop_db = f" {psnr_y(crop, hr_crop):.2f} dB"
        framed = cv2.rectangle(image.copy(), (left, top), (left + side - 1, top + side - 1), CROP_BOX_COLOR, 1)
        full.append(titled(framed, f"{name}{db}"))
        crops.append(titled(cv2.resize(crop, (w, w), interpolation=cv2.INTER_NEAREST),
                            f"{name} {side}px crop{crop_db}"))
    return np.vstack([np.hstack(full), np.hstack(crops)]), psnr


# ---------------------------------------------------------------------------------------------- commands
def _write(out_dir, record, command, picture) -> str:
    path = os.path.join(out_dir, f"{image_stem(record)}_{command}.png")
    if not cv2.imwrite(path, picture):
        raise IOError(f"could not write {path}")
    return path


def cmd_predictions(args, cfg, model, records, names):
    written = []
    for record in records:
        image = read_image_any(record["file_name"], format="BGR", **read_options(cfg))
        run = run_model(model, image, cfg.INPUT.FORMAT)
        written.append(_write(args.out, record, "predictions", draw_predictions(image, run, record, names, args.score)))
    return written


def cmd_features(args, cfg, model, records, names):
    models = [(args.label or describe(cfg), cfg, model)]
    if args.weights2 or args.config_file2:
        cfg2, model2 = load_model(args.config_file2 or args.config_file, args.weights2, args.opts, args.device)
        models.append((args.label2 or describe(cfg2), cfg2, model2))
    written = []
    for record in records:
        image = read_image_any(record["file_name"], format="BGR", **read_options(cfg))
        rows = [(label, run_model(m, image, c.INPUT.FORMAT).features) for label, c, m in models]
        written.append(_write(args.out, record, "features", draw_features(image, rows, args.reduce)))
    return written


def cmd_saliency(args, cfg, model, records, names):
    written = []
    for record in records:
        image = read_image_any(record["file_name"], format="BGR", **read_options(cfg))
        with model.outputs(saliency=True):
            run = run_model(model, image, cfg.INPUT.FORMAT)
        written.append(_write(args.out, record, "saliency", draw_saliency(image, run.outputs["saliency"])))
    return written


def cmd_sr(args, cfg, model, records, names):
    written = []
    for record in records:
        image = read_image_any(record["file_name"], format="BGR", **read_options(cfg))
        with model.outputs(sr=True):
            run = run_model(model, image, cfg.INPUT.FORMAT)
        sr = pixels_to_bgr(run.outputs["sr"], cfg.INPUT.FORMAT)
        bicubic = bicubic_upsample(run.lr, image.shape[:2])
        window = zoom_window(gt_boxes(record), image.shape[:2], args.crop_size)
        picture, psnr = draw_sr(image, run.lr, sr, bicubic, window, run.scale, args.residual_gain)
        written.append(_write(args.out, record, "sr", picture))
        print(f"{image_stem(record)}: PSNR SR {psnr['sr']:.2f} dB, bicubic {psnr['bicubic']:.2f} dB")
    return written


COMMANDS = {"predictions": cmd_predictions, "features": cmd_features, "saliency": cmd_saliency, "sr": cmd_sr}


def check_config(command: str, cfg) -> None:
    """Fail before building anything when the config lacks the branch the picture shows."""
    s = cfg.MODEL.SDCONET
    if command == "saliency" and not s.SALIENCY.ENABLED:
        raise ConfigError("the config has MODEL.SDCONET.SALIENCY.ENABLED False, so the model predicts no "
                          "saliency maps: use a config with saliency enabled (e.g. sdconet_tiny_synthetic.yaml)")
    if command == "sr" and not s.SR.ENABLED:
        raise ConfigError("the config has MODEL.SDCONET.SR.ENABLED False, so the model has no SR branch: "
                          "use a config with the SR branch (e.g. sdconet_tiny_synthetic.yaml)")


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config-file", required=True)
    common.add_argument("--weights", default="", help="checkpoint; empty = random init (smoke tests, warns)")
    common.add_argument("--dataset", default="", help="registered dataset (default: the config's DATASETS.TEST[0])")
    common.add_argument("--num", type=int, default=4, help="number of images (the dataset's first ones)")
    common.add_argument("--out", default="output/visualize", help="folder for the PNGs")
    common.add_argument("--device", default=None, help="cpu, cuda, ... (default: MODEL.DEVICE, CPU without CUDA)")
    common.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides KEY VALUE ... (last on the command line)")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predictions", parents=[common], help="predictions vs GT on the LR input and on HR")
    p.add_argument("--score", "--score-thresh", dest="score", type=float, default=0.3,
                   help="draw predictions scoring at least this")
    p = sub.add_parser("features", parents=[common], help="Swin stage heat-maps, one or two checkpoints")
    p.add_argument("--weights2", default="", help="second checkpoint (second row)")
    p.add_argument("--config-file2", default="", help="config of the second checkpoint (default: --config-file)")
    p.add_argument("--label", default="", help="first row's label (default: from the config, e.g. DINO)")
    p.add_argument("--label2", default="", help="second row's label (default: from its config, e.g. SDCoNet)")
    p.add_argument("--reduce", choices=("mean_abs", "l2"), default="mean_abs",
                   help="channel reduction: mean of |activation| or L2 norm")
    sub.add_parser("saliency", parents=[common], help="per-level saliency maps (saliency-enabled configs)")
    p = sub.add_parser("sr", parents=[common], help="LR, bicubic, SR, residual and HR with PSNR (SR-enabled configs)")
    p.add_argument("--crop-size", type=int, default=64, help="side of the zoom window, HR pixels")
    p.add_argument("--residual-gain", type=float, default=8.0, help="amplification of the SR - bicubic panel")
    return parser.parse_args(argv)


def main(argv=None) -> List[str]:
    args = parse_args(argv)
    check_config(args.command, get_sdconet_cfg(args.config_file, args.opts))
    cfg, model = load_model(args.config_file, args.weights, args.opts, args.device)
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")
    if not dataset:
        raise ValueError("no --dataset given and the config has no DATASETS.TEST")
    records = load_records(dataset, args.num)
    names = class_names(dataset, cfg.MODEL.SDCONET.NUM_CLASSES)
    os.makedirs(args.out, exist_ok=True)
    written = COMMANDS[args.command](args, cfg, model, records, names)
    for path in written:
        print(path)
    print(f"wrote {len(written)} PNG(s) for {len(records)} image(s) of {dataset} to {args.out}")
    return written


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
