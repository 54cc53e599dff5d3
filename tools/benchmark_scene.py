#!/usr/bin/env python
"""Large-scene throughput and peak memory: the model alone, tools/predict.py's pipeline, and SAHI.

For each --sizes N it writes (once, cached in --scene-dir) an N x N RGB uint8 GeoTIFF (DEFLATE,
512 px blocks, UTM georeference) tiled with rendered Synthetic_RS scenes at low resolution (the
input the models are trained on; predict.py without --degrade), then measures, each in a
fresh Python process so that its peak RSS (``getrusage`` high-water mark) belongs to that
measurement alone:

  model     the model on --model-tiles tiles of the scene decoded beforehand: tiles/s (the ceiling)
  pipeline  tools/predict.py's ``run_scenes`` on the file: windowed reading by a reader thread,
            the model, the merge and the outputs (GeoJSON, drawing); tiles/s, Mpx/s, peak RSS
  pipeline_no_drawing  the same with predict.py --no-drawing (GeoJSON only: the drawing, by
            detectron2's matplotlib Visualizer, costs seconds per scene)
  sahi      SAHI's ``get_sliced_prediction`` wrapping the same Predictor (same slices, overlap,
            score threshold and NMS), the scene read whole first as SAHI needs it (--sahi; SAHI
            comes with the ``benchmark`` extra, never with sdconet)

All runs use --threads torch threads, after 2 untimed batches. The printed block (machine,
command line, table) is meant to be pasted into BENCHMARKS.md.

Example:
  python tools/benchmark_scene.py --config-file configs/quick_schedules/sdconet_tiny_synthetic_stride4.yaml \
      --weights output/demo/model_final.pth --sizes 4096 16384 --sahi --json output/benchmark_scene.json
"""
import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

from sdconet.utils.report import machine_info, peak_rss_mib

MiB = 1024 * 1024
BLOCK = 512  # GeoTIFF block side, also the side of the rendered tiles the scene repeats


# ---------------------------------------------------------------------- the scene
def scene_tiles(seed: int = 0, count: int = 16):
    """Rendered Synthetic_RS tiles at the scale the models see: 1024 px HR tiles area-downsampled x2 to
    512 px LR, objects as small as in the low-resolution training input (3 x 512 x 512, R, G, B)."""
    import cv2

    from sdconet.data.synthetic import render_tile

    return [np.ascontiguousarray(cv2.resize(render_tile(seed, "test", i, 2 * BLOCK)[0], (BLOCK, BLOCK),
                                            interpolation=cv2.INTER_AREA)[:, :, ::-1].transpose(2, 0, 1))
            for i in range(count)]


def write_scene(path: str, size: int, seed: int = 0):
    """An N x N RGB uint8 GeoTIFF of :func:`scene_tiles` in a shifted pattern, written band of blocks by
    band of blocks (memory stays at one row of blocks), to a temporary name first."""
    import rasterio
    from affine import Affine

    tiles = scene_tiles(seed)
    profile = dict(driver="GTiff", height=size, width=size, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0), tiled=True,
                   blockxsize=BLOCK, blockysize=BLOCK, compress="deflate")
    partial = path + ".partial.tif"
    with rasterio.open(partial, "w", **profile) as dst:
        for row, y in enumerate(range(0, size, BLOCK)):
            h = min(BLOCK, size - y)
            band = np.concatenate([tiles[(row * 5 + col) % 16] for col in range(-(-size // BLOCK))], axis=2)
            dst.write(band[:, :h, :size], window=rasterio.windows.Window(0, y, size, h))
    os.replace(partial, path)
    return path


def scene_path(scene_dir: str, size: int) -> str:
    path = os.path.join(scene_dir, f"scene_{size}.tif")
    if not os.path.exists(path):
        os.makedirs(scene_dir, exist_ok=True)
        print(f"writing {path} ...", flush=True)
        write_scene(path, size)
    return path


# ---------------------------------------------------------------------- the measurements (child process)
def build_predictor(args):
    import torch

    import sdconet

    torch.set_num_threads(args.threads)
    # The scene is the real low-quality input, as tools/predict.py without --degrade.
    return sdconet.Predictor(args.config_file, args.weights, device="cpu", opts=sdconet.lr_input_opts(),
                             score_thresh=args.score_thresh)


def first_tiles(args, count: int):
    """The first ``count`` tiles of the scene's grid holding data, decoded (CHW uint8 BGR tensors)."""
    from sdconet.inference.scene_reader import open_scene
    from sdconet.inference.tiling import tile_grid

    scene = open_scene(args.scene)
    try:
        images = []
        for t in tile_grid(scene.height, scene.width, args.tile, args.overlap):
            image, has_data = scene.read(t)
            if has_data:
                images.append(image)
            if len(images) == count:
                break
        return images
    finally:
        scene.close()


def warm_up(predictor, args):
    """Two untimed batches: one-time costs (kernel selection, first allocations) stay out of the timing."""
    images = first_tiles(args, 2 * args.batch)
    for start in range(0, len(images), args.batch):
        predictor.predict_tiles(images[start:start + args.batch], args.score_thresh)


def measure_model(args) -> dict:
    predictor = build_predictor(args)
    warm_up(predictor, args)
    images = first_tiles(args, args.model_tiles)
    start = time.perf_counter()
    for i in range(0, len(images), args.batch):
        predictor.predict_tiles(images[i:i + args.batch], args.score_thresh)
    seconds = time.perf_counter() - start
    return {"tiles": len(images), "seconds": seconds}


def measure_pipeline(args, drawing: bool = True) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import predict

    predictor = build_predictor(args)
    warm_up(predictor, args)
    rss_before = peak_rss_mib()
    with tempfile.TemporaryDirectory() as out:
        predict_args = predict.parse_args([
            "--config-file", args.config_file, args.scene, "--output", out, "--tile", str(args.tile),
            "--overlap", str(args.overlap), "--batch", str(args.batch), "--score-thresh", str(args.score_thresh),
            *([] if drawing else ["--no-drawing"])])
        names = predict.output_names([args.scene])
        start = time.perf_counter()
        failed = predict.run_scenes(predictor, [(0, args.scene)], names, predict.class_names(predictor.cfg),
                                    predict_args)
        seconds = time.perf_counter() - start
        if failed:
            raise SystemExit(f"benchmark_scene.py: error: {failed[0][1]}")
        with open(predict.scene_file(out, names[0], "geojson")) as f:
            detections = len(json.load(f)["features"])
    from sdconet.inference.scene_reader import open_scene
    from sdconet.inference.tiling import tile_grid

    scene = open_scene(args.scene)
    tiles = len(tile_grid(scene.height, scene.width, args.tile, args.overlap))
    scene.close()
    return {"tiles": tiles, "seconds": seconds, "detections": detections, "peak_rss_before_mib": rss_before}


def sahi_model(predictor):
    """SAHI's detectron2 wrapper around our Predictor: SAHI hands RGB slices, the Predictor takes BGR."""
    from sahi.models.detectron2 import Detectron2DetectionModel

    import predict

    class PredictorModel(Detectron2DetectionModel):
        def set_model(self, model, **kwargs):
            self.model = model
            self.category_names = predict.class_names(model.cfg)
            self.category_mapping = {str(i): name for i, name in enumerate(self.category_names)}

        def perform_inference(self, image):
            self._original_predictions = {"instances": self.model(np.ascontiguousarray(image[:, :, ::-1]))}

    return PredictorModel(model=predictor, confidence_threshold=predictor.score_thresh, device="cpu")


def measure_sahi(args) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sahi.predict import get_sliced_prediction
    from sahi.slicing import get_slice_bboxes

    from sdconet.inference.scene_reader import bounded_block_cache

    predictor = build_predictor(args)
    warm_up(predictor, args)
    model = sahi_model(predictor)
    rss_before = peak_rss_mib()
    ratio = args.overlap / args.tile
    start = time.perf_counter()
    with bounded_block_cache():  # as predict.py: GDAL would otherwise also cache the blocks of the whole read
        image = predictor.read_image(args.scene)[:, :, ::-1]  # SAHI takes the whole scene in memory, RGB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = get_sliced_prediction(image, model, slice_height=args.tile, slice_width=args.tile,
                                       overlap_height_ratio=ratio, overlap_width_ratio=ratio,
                                       perform_standard_pred=False, postprocess_type="NMS",
                                       postprocess_match_metric="IOU", postprocess_match_threshold=0.5,
                                       verbose=0, batch_size=args.batch)
    seconds = time.perf_counter() - start
    tiles = len(get_slice_bboxes(image.shape[0], image.shape[1], args.tile, args.tile, False, ratio, ratio))
    return {"tiles": tiles, "seconds": seconds, "detections": len(result.object_prediction_list),
            "peak_rss_before_mib": rss_before}


MEASURES = {"model": measure_model, "pipeline": measure_pipeline,
            "pipeline_no_drawing": functools.partial(measure_pipeline, drawing=False), "sahi": measure_sahi}


def child(args):
    result = MEASURES[args.measure](args)
    result.update(peak_rss_mib=peak_rss_mib(), tiles_per_s=result["tiles"] / result["seconds"])
    print(json.dumps(result))


# ---------------------------------------------------------------------- the run (parent process)
def run_child(args, measure: str, scene: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", measure, "--scene", scene,
               "--config-file", args.config_file, "--weights", args.weights, "--threads", str(args.threads),
               "--tile", str(args.tile), "--overlap", str(args.overlap), "--batch", str(args.batch),
               "--score-thresh", str(args.score_thresh), "--model-tiles", str(args.model_tiles)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(command, stdout=subprocess.PIPE, env=env, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark_scene.py: error: the {measure} run on {scene} failed "
                         f"(exit status {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(result: dict) -> str:
    lines = ["| scene | run | tiles | seconds | tiles/s | % of model-only | Mpx/s | detections | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size, runs in result["scenes"].items():
        model = runs["model"]["tiles_per_s"]
        for name, r in runs.items():
            mpx = "" if name == "model" else f"{int(size) ** 2 / 1e6 / r['seconds']:.2f}"
            lines.append(f"| {size}² | {name} | {r['tiles']} | {r['seconds']:.1f} | {r['tiles_per_s']:.2f} | "
                         f"{100 * r['tiles_per_s'] / model:.0f}% | {mpx} | {r.get('detections', '')} | "
                         f"{r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/quick_schedules/sdconet_tiny_synthetic.yaml")
    parser.add_argument("--weights", default="", help="checkpoint; empty = untrained weights")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384], help="scene sides in pixels")
    parser.add_argument("--scene-dir", default="output/benchmark_scene", help="where the scenes are cached")
    parser.add_argument("--sahi", action="store_true", help="also time SAHI's get_sliced_prediction")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="tiles per forward pass")
    parser.add_argument("--score-thresh", type=float, default=0.3)
    parser.add_argument("--model-tiles", type=int, default=48, help="tiles of the model-only run")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    parser.add_argument("--child", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--scene", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.measure = args.child
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.sahi:
        import importlib.util

        if importlib.util.find_spec("sahi") is None:
            raise SystemExit("benchmark_scene.py: error: --sahi needs SAHI: pip install -e .[benchmark]")
    command = "python tools/benchmark_scene.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    result = {"command": command, "machine": machine_info("cpu"), "threads": args.threads, "tile": args.tile,
              "overlap": args.overlap, "batch": args.batch, "scenes": {}}
    for size in args.sizes:
        scene = scene_path(args.scene_dir, size)
        runs = result["scenes"][str(size)] = {}
        for measure in ["model", "pipeline", "pipeline_no_drawing"] + (["sahi"] if args.sahi else []):
            print(f"{size}²: {measure} ...", flush=True)
            runs[measure] = run_child(args, measure, scene)
    print(f"\n{command}\n{result['machine'].get('cpu', '')}, {args.threads} torch threads, tile {args.tile}, "
          f"overlap {args.overlap}, batch {args.batch}\n")
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
