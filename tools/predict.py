#!/usr/bin/env python
"""Detect objects in images or large scenes (files, folders, globs) with a trained SDCoNet.

Writes to --output, per scene (each file written to a temporary file, then renamed):
  <name>.png              the detections drawn (on a downscaled copy for scenes larger than --draw-max-side;
                          not with --no-drawing)
  <name>.geojson          box polygons: map coordinates + "crs" for georeferenced GeoTIFFs, pixels otherwise;
                          written last: it marks the scene as done
  <name>.failed.json      instead of both, for a file that could not be read (its error)
and once all scenes are done or failed:
  results.json            COCO results (one entry per box: file_name, image_id, category_id, bbox xywh, score)
  summary.json            per scene: file, output name, number of detections or the error

Without --degrade the images are taken as the real low-quality input (MODEL.SDCONET.DEGRADE.TEST False,
TEST.SDCONET.SR_QUALITY False); with it they are treated as HR and degraded inside the model (the
benchmark protocol). Files are read as in training: TIFF / GeoTIFF with rasterio, the bands and
12/16-bit scaling of INPUT.SDCONET.BANDS / SCALING / PERCENTILES / MAX_VALUE (set them with --opts).

Large scenes: GeoTIFF / JPEG 2000 files are read window by window, tile by tile, so memory does not
grow with the scene (same pixels as decoding them whole; --whole-image decodes every file whole).
Tiles without data (all 0, or masked by the file's nodata / mask) are skipped. A reader thread
reads and scales the next tiles (and the next scene) while the model runs, --prefetch batches ahead.

Many scenes: a rerun skips the scenes whose GeoJSON exists (--overwrite redoes them), so a killed
run goes on where it stopped. Several processes share the scene list: after sorting, scene i goes
to shard i % N (--shard I/N, or RANK and WORLD_SIZE as torchrun sets them; see
docs/training_at_scale.md); the last shard to finish writes results.json and summary.json.

An unreadable file is skipped with an error line and the others are still written; the run then
exits with status 1, listing the skipped files (--strict stops at the first one instead).

Example:
  python tools/predict.py --config-file configs/quick_schedules/sdconet_tiny_synthetic_stride4.yaml \
      --weights output/demo/model_final.pth scenes/ --output output/predictions --score-thresh 0.3 \
      --opts MODEL.SDCONET.TRANSFORMER.NUM_DETECTIONS 100
  torchrun --nproc_per_node 4 tools/predict.py --config-file C --weights W scenes/ --output out/
"""
import argparse
import functools
import glob
import json
import math
import os
import re
import socket
import sys

import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import Visualizer
from tqdm import tqdm

import sdconet  # registers the model and datasets
from sdconet.data.image_io import read_options
from sdconet.engine.checkpoint import atomic_write
from sdconet.inference import Predictor
from sdconet.inference.geo import detections_to_geojson
from sdconet.inference.prefetch import Prefetcher
from sdconet.inference.scene_reader import (SceneEnd, SceneFailed, SceneStart, TileBatch, bounded_block_cache,
                                            open_scene, scene_stream)
from sdconet.inference.tiling import merge_tile_detections

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".jp2")
SUFFIXES = {"drawing": ".png", "geojson": ".geojson", "failed": ".failed.json"}


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


def shard(text):
    """argparse type: ``I/N``, this process's shard I (from 0) of N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"must be I/N with 0 <= I < N, got {text!r}")
    return int(match[1]), int(match[2])


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
    parser.add_argument("--device", default=None,
                        help="default: MODEL.DEVICE; under torchrun a CUDA device becomes cuda:LOCAL_RANK")
    parser.add_argument("--draw-max-side", type=integer(1), default=2048, help="larger scenes are drawn downscaled")
    parser.add_argument("--no-drawing", action="store_true",
                        help="write no <name>.png: GeoJSON only (the drawing is the slowest output of a scene)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable file (default: skip it)")
    parser.add_argument("--whole-image", action="store_true",
                        help="decode every file whole (default: GeoTIFF / JPEG 2000 are read window by window)")
    parser.add_argument("--prefetch", type=integer(1), default=2,
                        help="items (tile batches, scene starts and ends) the reader thread reads ahead")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo scenes whose outputs exist (default: skip them, which resumes a killed run)")
    parser.add_argument("--shard", type=shard, default=None, metavar="I/N",
                        help="process scenes i with i %% N == I (default: RANK/WORLD_SIZE of torchrun, else 0/1)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides KEY VALUE ... (last on the command line)")
    args = parser.parse_args(argv)
    if args.overlap >= args.tile:
        parser.error(f"argument --overlap: must be smaller than --tile ({args.tile}), got {args.overlap}")
    if args.shard is None:
        try:
            args.shard = shard_from_env()
        except ValueError as e:
            parser.error(str(e))
    return args


def shard_from_env():
    """(RANK, WORLD_SIZE) as torchrun (or a scheduler's wrapper) sets them; (0, 1) without them."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None and world is None:
        return 0, 1
    try:
        rank, world = int(rank), int(world)
    except (TypeError, ValueError):
        raise ValueError(f"RANK and WORLD_SIZE must both be integers, got RANK={rank!r}, WORLD_SIZE={world!r}") \
            from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world}")
    return rank, world


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


def output_names(files):
    """The output name of each file: its stem, then stem_2, stem_3... for the same name in other folders.

    Computed over the whole list (not per shard), so every shard and every rerun agrees.
    """
    names, used = [], set()
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        names.append(name)
    return names


def class_names(cfg):
    for name in cfg.DATASETS.TEST:
        names = MetadataCatalog.get(name).get("thing_classes", None)
        if names:
            return list(names)
    return [f"class_{i}" for i in range(cfg.MODEL.SDCONET.NUM_CLASSES)]


def draw(thumbnail_bgr, scale, boxes, scores, classes, names):
    """The detections (scene pixels) drawn with detectron2's Visualizer on the scene's copy at ``scale``."""
    viz = Visualizer(thumbnail_bgr[:, :, ::-1], metadata=None, scale=1.0)
    labels = [f"{names[c] if c < len(names) else c} {s:.2f}" for c, s in zip(classes.tolist(), scores.tolist())]
    out = viz.overlay_instances(boxes=boxes * scale, labels=labels) if len(boxes) else viz.output
    return out.get_image()[:, :, ::-1]


# ---------------------------------------------------------------------- per-scene files
def scene_file(output, name, kind):
    return os.path.join(output, name + SUFFIXES[kind])


def write_json(path, data):
    atomic_write(path, lambda f: f.write(json.dumps(data).encode()))


def write_summary_json(path, data):
    """As ``atomic_write``, with a temporary name unique across machines: shards finishing at the same
    moment may all write the summary (the same content), from several hosts on a shared file system."""
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def remove(*paths):
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def read_json(path):
    """The file's json, or ``None`` when it is missing or unreadable (never half-written: see atomic_write)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def scene_state(output, name, path):
    """("done", its GeoJSON) / ("failed", error text) / (None, None): the outputs of ``path`` under ``name``.

    Outputs of another file that had the same name (another input list) do not count.
    """
    same = lambda image: isinstance(image, str) and os.path.realpath(image) == os.path.realpath(path)  # noqa: E731
    collection = read_json(scene_file(output, name, "geojson"))
    if isinstance(collection, dict) and same(collection.get("properties", {}).get("image")):
        return "done", collection
    failed = read_json(scene_file(output, name, "failed"))
    if isinstance(failed, dict) and same(failed.get("image")):
        return "failed", failed.get("error", "")
    return None, None


def write_scene(output, name, start, end, boxes, scores, classes, names):
    """The drawing (unless --no-drawing: then an old one is removed), then the GeoJSON (the scene's "done"
    mark), each atomically; drop an old failure."""
    boxes = boxes.numpy().astype(np.float64)
    scores, classes = scores.numpy(), classes.numpy()
    transform, crs = start.georeference if start.georeference is not None else (None, None)
    collection = detections_to_geojson(boxes, scores, classes, names, transform, crs, image_file=start.path)
    paths = [scene_file(output, name, kind) for kind in SUFFIXES]
    remove(*[tmp for p in paths for tmp in glob.glob(glob.escape(p) + ".tmp-*")])  # left by a killed run
    if end.thumbnail is None:
        remove(paths[0])
    else:
        ok, png = cv2.imencode(".png", draw(end.thumbnail, end.scale, boxes, scores, classes, names))
        if not ok:
            raise RuntimeError(f"OpenCV could not encode the drawing of {start.path}")
        atomic_write(paths[0], lambda f: f.write(png.tobytes()))
    write_json(paths[1], collection)
    remove(paths[2])


def write_failure(output, name, path, error):
    """The failure mark of a file that could not be read (outputs of an earlier run of it removed)."""
    remove(scene_file(output, name, "drawing"), scene_file(output, name, "geojson"))
    write_json(scene_file(output, name, "failed"), {"image": path, "error": str(error)})


def write_summary(output, files, names, states):
    """results.json (COCO results of the done scenes) and summary.json; returns (detections, failed files)."""
    results, scenes, failed = [], [], []
    for image_id, (path, name, (status, value)) in enumerate(zip(files, names, states)):
        scene = {"image_id": image_id, "file_name": path, "output": name, "status": status or "not done"}
        if status == "done":
            for feature in value["features"]:
                p = feature["properties"]
                x0, y0, x1, y1 = p["bbox_pixels"]
                results.append({"file_name": path, "image_id": image_id, "category_id": p["category_id"],
                                "category": p["category"],
                                "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                                "score": round(float(p["score"]), 5)})
            scene["detections"] = len(value["features"])
        elif status == "failed":
            scene["error"] = value
            failed.append(path)
        scenes.append(scene)
    write_summary_json(os.path.join(output, "results.json"), results)
    write_summary_json(os.path.join(output, "summary.json"), {
        "scenes": len(files), "done": sum(s["status"] == "done" for s in scenes), "failed": len(failed),
        "detections": len(results), "per_scene": scenes})
    return len(results), failed


# ---------------------------------------------------------------------- the run
def pick_device(args, opts):
    """--device, else MODEL.DEVICE; under torchrun (LOCAL_RANK set) a plain "cuda" becomes cuda:LOCAL_RANK."""
    if args.device is not None:
        return args.device
    device = sdconet.get_sdconet_cfg(args.config_file, opts).MODEL.DEVICE
    local = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local is not None and torch.cuda.is_available():
        return f"cuda:{int(local) % torch.cuda.device_count()}"
    return device


def run_scenes(predictor, jobs, names, class_list, args):
    """Detect on each (index, path) of ``jobs`` and write its outputs; returns (path, error) of unreadable files.

    A reader thread (:class:`Prefetcher`) opens the scenes and reads their tiles while the model
    runs; with --strict the run stops at the first unreadable file.
    """
    read = functools.partial(open_scene, whole=args.whole_image, **read_options(predictor.cfg))
    stream = scene_stream(jobs, read, args.tile, args.overlap, args.batch,
                          None if args.no_drawing else args.draw_max_side)
    failed, tiles_bar = [], None
    with bounded_block_cache(), Prefetcher(stream, depth=args.prefetch, name="scene-reader") as items, \
            tqdm(total=len(jobs), desc="scenes", unit="scene") as scenes_bar:
        for item in items:
            if isinstance(item, SceneStart):
                start, per_tile, tiles = item, [], []
                tiles_bar = tqdm(total=len(item.tiles), desc="tiles", unit="tile", leave=False)
            elif isinstance(item, TileBatch):
                per_tile += predictor.predict_tiles(item.images, predictor.score_thresh)
                tiles += item.tiles
                tiles_bar.update(len(item.tiles))
            elif isinstance(item, SceneEnd):
                tiles_bar.close()
                boxes, scores, classes = merge_tile_detections(per_tile, tiles, args.nms_iou)
                write_scene(args.output, names[item.index], start, item, boxes, scores, classes, class_list)
                scenes_bar.update(1)
            elif isinstance(item, SceneFailed):
                if tiles_bar is not None:
                    tiles_bar.close()
                write_failure(args.output, names[item.index], item.path, item.error)
                failed.append((item.path, item.error))
                scenes_bar.update(1)
                if args.strict:
                    break
                tqdm.write(f"predict.py: skipping unreadable file: {item.error}", file=sys.stderr)
    return failed


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
    rank, world = args.shard
    names = output_names(files)
    os.makedirs(args.output, exist_ok=True)
    mine = [i for i in range(len(files)) if i % world == rank]
    todo = [i for i in mine if args.overwrite or scene_state(args.output, names[i], files[i])[0] != "done"]
    where = f" (shard {rank}/{world})" if world > 1 else ""
    if len(todo) < len(mine):
        print(f"{len(mine) - len(todo)} of {len(mine)} scene(s){where} already done in {args.output}: "
              "skipped (--overwrite redoes them)")
    failed = []
    if todo:
        # Without --degrade the images are the real low-quality input (as train_net.py --lr-input).
        opts = list(args.opts) + (["MODEL.SDCONET.DEGRADE.TEST", True] if args.degrade else sdconet.lr_input_opts())
        predictor = Predictor(args.config_file, args.weights, device=pick_device(args, opts), opts=opts,
                              score_thresh=args.score_thresh)
        failed = run_scenes(predictor, [(i, files[i]) for i in todo], names, class_names(predictor.cfg), args)
        if failed and args.strict:
            states = [scene_state(args.output, n, f) for f, n in zip(files, names)]
            write_summary(args.output, files, names, states)
            done = sum(status == "done" for status, _ in states)
            sys.exit(f"predict.py: error: {failed[0][1]} (stopped by --strict; results of the {done} "
                     f"finished scene(s) written to {args.output})")
    # The last shard to finish sees every scene done or failed and writes the summary.
    complete = all(os.path.exists(scene_file(args.output, n, "geojson"))
                   or os.path.exists(scene_file(args.output, n, "failed")) for n in names)
    states = [scene_state(args.output, n, f) for f, n in zip(files, names)] if complete else []
    if complete and all(status is not None for status, _ in states):
        detections, failed_all = write_summary(args.output, files, names, states)
        print(f"{detections} detections in {len(files) - len(failed_all)} image(s) written to {args.output}")
        if failed_all:
            sys.exit(f"predict.py: error: {len(failed_all)} of {len(files)} file(s) skipped as unreadable:\n  "
                     + "\n  ".join(failed_all))
    else:
        print(f"{len(todo) - len(failed)} scene(s){where} written to {args.output}; results.json and summary.json "
              "are written by the last shard to finish")
        if failed:
            sys.exit(f"predict.py: error: {len(failed)} of {len(mine)} file(s){where} skipped as unreadable:\n  "
                     + "\n  ".join(path for path, _ in failed))


if __name__ == "__main__":
    main()
