#!/usr/bin/env python
"""Peak host memory (RSS high-water mark) of tiled prediction on a large scene.

Writes a synthetic SIZE x SIZE PNG scene (built from rendered 512 tiles), then runs a fresh Python
process that imports sdconet, builds the model, reads the PNG with ``Predictor.read_image`` and runs
``Predictor.predict_large``. That process reports its RSS after each step and its peak
(``getrusage(RUSAGE_SELF).ru_maxrss``), so the figure *includes* the interpreter, torch, the model,
the file bytes, the decoded scene array (SIZE^2 x 3 bytes) and the tile batches.

Example:
  python tools/benchmark_memory.py --config-file configs/quick_schedules/sdconet_tiny_synthetic_stride4.yaml \
      --weights output/demo/model_final.pth --size 8000
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

MiB = 1024 * 1024


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def write_scene(path: str, size: int):
    import cv2

    from sdconet.data.synthetic import render_tile

    tiles = [render_tile(0, "test", i, 512)[0] for i in range(4)]
    reps = -(-size // 1024)
    block = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    scene = np.tile(block, (reps, reps, 1))[:size, :size]
    cv2.imwrite(path, scene, [cv2.IMWRITE_PNG_COMPRESSION, 1])


def child(args):
    """Measured run, in its own process so the peak belongs to prediction alone."""
    stages = {"start": current_rss()}
    import torch

    import sdconet
    from sdconet.utils.report import peak_rss_mib

    torch.set_num_threads(args.threads)
    predictor = sdconet.Predictor(args.config_file, args.weights, device="cpu", score_thresh=args.score_thresh)
    stages["model_built"] = current_rss()
    start = time.perf_counter()
    image = predictor.read_image(args.image)  # the configured bands / scaling, as tools/predict.py
    read_s = time.perf_counter() - start
    stages["image_read"] = current_rss()
    start = time.perf_counter()
    result = predictor.predict_large(image, tile=args.tile, overlap=args.overlap, batch=args.batch,
                                     progress=True)
    predict_s = time.perf_counter() - start
    stages["after_predict"] = current_rss()
    print(json.dumps({"image": list(image.shape), "detections": len(result), "read_s": read_s,
                      "predict_s": predict_s, "rss_mib": {k: v / MiB for k, v in stages.items()},
                      "peak_rss_mib": peak_rss_mib()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/quick_schedules/dino_tiny_synthetic.yaml")
    parser.add_argument("--weights", default="", help="checkpoint; empty = untrained weights (same memory)")
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score-thresh", type=float, default=0.3)
    parser.add_argument("--limit-gib", type=float, default=2.0, help="exit 1 when the peak is above it")
    parser.add_argument("--image", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"scene_{args.size}.png")
        write_scene(path, args.size)
        command = [sys.executable, os.path.abspath(__file__), "--child", "--image", path] + [
            a for a in sys.argv[1:]]
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    h, w = report["image"][:2]
    print(f"scene {h}x{w} (PNG, {h * w * 3 / MiB:.0f} MiB decoded), tile {args.tile}, overlap {args.overlap}, "
          f"batch {args.batch}, {args.threads} CPU threads")
    for stage, mib in report["rss_mib"].items():
        print(f"  RSS {stage:>14}: {mib:8.1f} MiB")
    print(f"  peak RSS (interpreter + torch + model + file bytes + decoded image + tiles): "
          f"{report['peak_rss_mib']:.1f} MiB")
    print(f"  read {report['read_s']:.1f} s, predict {report['predict_s']:.1f} s, {report['detections']} detections")
    if report["peak_rss_mib"] > args.limit_gib * 1024:
        sys.exit(f"peak RSS above {args.limit_gib} GiB")


if __name__ == "__main__":
    main()
