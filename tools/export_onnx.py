#!/usr/bin/env python
"""Export SDCoNet's inference path to ONNX and check it against PyTorch with ONNX Runtime.

The graph takes a normalised (1, 3, H, W) image of the size given here and returns raw
``logits`` (1, Q, C) and ``boxes`` (1, Q, 4, cxcywh relative to the image); top-k and scaling to
pixels are done by ``sdconet.inference.export.decode_detections`` for both runners.
With --degrade the input is the HR image (degraded inside the graph, benchmark protocol);
without it the input is the real low-quality image (and TEST.SDCONET.SR_QUALITY is turned off, as
by train_net.py --lr-input). The SR branch is not part of the graph: detection does not use it.

Example (the `make demo` model):
  python tools/export_onnx.py --config-file configs/quick_schedules/sdconet_tiny_synthetic_stride4.yaml \
      --weights output/demo/model_final.pth --output output/demo/model.onnx --height 512 --width 512
"""
import argparse
import os
import sys

import onnx
import torch

import sdconet  # registers the model
from sdconet.data.synthetic import render_tile
from sdconet.inference import Predictor
from sdconet.inference.export import compare, export_onnx, normalise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default="", help="checkpoint; empty = untrained weights")
    parser.add_argument("--output", required=True, help="path of the .onnx file")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--degrade", action="store_true", help="the input is HR, degraded inside the graph")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max box difference (pixels) accepted")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ... (last)")
    args = parser.parse_args(argv)

    # Without --degrade the input is the low-quality image (as train_net.py --lr-input).
    opts = list(args.opts) + (["MODEL.SDCONET.DEGRADE.TEST", True] if args.degrade else sdconet.lr_input_opts())
    predictor = Predictor(args.config_file, args.weights, device="cpu", opts=opts)
    model = predictor.model
    export_onnx(model, args.output, args.height, args.width, args.opset)
    nodes = len(onnx.load(args.output, load_external_data=False).graph.node)
    print(f"wrote {args.output} (input 1x3x{args.height}x{args.width}, opset {args.opset}, {nodes} nodes, "
          f"{os.path.getsize(args.output) / 2**20:.1f} MiB)")

    # Check on a synthetic scene (real image statistics) of the export size.
    scene, _ = render_tile(0, "test", 0, max(args.height, args.width))
    diffs = compare(model, args.output, normalise(model, scene[:args.height, :args.width]))
    print("max |PyTorch - ONNX Runtime|: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in diffs.items()))
    if diffs["boxes_px"] > args.tolerance or diffs["unmatched"] > 2:
        sys.exit(f"ONNX check failed: boxes differ by {diffs['boxes_px']:.3g} px (tolerance {args.tolerance})")
    print("ONNX check passed")
    return diffs


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
