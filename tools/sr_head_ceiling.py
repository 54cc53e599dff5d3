#!/usr/bin/env python
"""The best PSNR the release SR head ("x2_bilinear") could ever reach on a dataset, next to bicubic.

The release head learns an image on a grid 2 x s coarser than HR (x2 PixelShuffle of the stride-4
tokens of the LR input, s = the degradation scale) and upsamples it bilinearly the rest of the way.
Whatever it learns, its output is a bilinear upsampling of a coarse image, so its PSNR is bounded
by the coarse image that fits HR best under that upsampling: a linear least-squares problem,
solved here with L-BFGS per batch of tiles. Printed per dataset (Y channel, 8-bit rounding, as
``SRQualityEvaluator``): bicubic from the model's LR input, the area-downsampled HR tile upsampled
bilinearly, and the least-squares ceiling.

    python tools/sr_head_ceiling.py --dataset synthetic_rs_test
    python tools/sr_head_ceiling.py --dataset synthetic_rs_test \
        --config-file configs/quick_schedules/sdconet_tiny_synthetic.yaml
"""
import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog

from sdconet import get_sdconet_cfg
from sdconet.data.image_io import read_image_any, read_options
from sdconet.evaluation.sr_quality import psnr_y, ssim_y
from sdconet.modeling.degradation import build_degradation

# Token stride of the Swin patch embedding x the release head's learned factor (x2): its grid is
# LR / 2, i.e. HR / (2 s).
RELEASE_LEARNED_FACTOR = 2


def bilinear_to(coarse: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def least_squares_coarse(hr: torch.Tensor, factor: int, steps: int) -> torch.Tensor:
    """The (B, 3, H/f, W/f) image whose bilinear upsampling is closest to ``hr`` in L2."""
    coarse = F.interpolate(hr, scale_factor=1 / factor, mode="area").contiguous().requires_grad_(True)
    optimizer = torch.optim.LBFGS([coarse], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (bilinear_to(coarse, hr.shape[-2:]) - hr).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return coarse.detach()


def measure(records, cfg, steps: int, batch: int = 16):
    degradation = build_degradation(cfg)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
    factor = RELEASE_LEARNED_FACTOR * degradation.scale
    rows = []
    for start in range(0, len(records), batch):
        images = [read_image_any(r["file_name"], format="BGR", **read_options(cfg))
                  for r in records[start: start + batch]]
        sizes = {im.shape[:2] for im in images}
        if len(sizes) != 1:
            raise ValueError(f"tiles of one batch must share a size, got {sorted(sizes)}")
        (h, w), = sizes
        if h % factor or w % factor:
            raise ValueError(f"tile size {h}x{w} is not a multiple of the release head's grid factor {factor}")
        hr = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).double().contiguous()
        with torch.no_grad():
            lr = degradation(((hr - mean) / std).float()).double() * std + mean
        bicubic = F.interpolate(lr.clamp(0, 255), size=(h, w), mode="bicubic", align_corners=False)
        area = bilinear_to(F.interpolate(hr, scale_factor=1 / factor, mode="area"), (h, w))
        ceiling = bilinear_to(least_squares_coarse(hr, factor, steps), (h, w))
        for i in range(hr.shape[0]):
            row = {}
            for name, image in (("bicubic", bicubic), ("area_bilinear", area), ("ceiling", ceiling)):
                pixels = image[i].clamp(0, 255).round()
                row[f"PSNR_{name}"] = psnr_y(pixels, hr[i])
                row[f"SSIM_{name}"] = ssim_y(pixels, hr[i])
            rows.append(row)
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}, factor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="synthetic_rs_test", help="registered dataset")
    parser.add_argument("--config-file", default="", help="degradation and pixel statistics (default: the defaults)")
    parser.add_argument("--num", type=int, default=0, help="first N images (0: all)")
    parser.add_argument("--steps", type=int, default=100, help="L-BFGS iterations per batch")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    cfg = get_sdconet_cfg(args.config_file, args.opts)
    records = DatasetCatalog.get(args.dataset)
    records = records[: args.num] if args.num > 0 else records
    result, factor = measure(records, cfg, args.steps)
    print(f"{args.dataset}: {len(records)} images, release grid HR/{factor}, Y channel, 8-bit")
    for name, label in (("bicubic", "bicubic from the LR input"),
                        ("area_bilinear", f"HR area-downsampled x{factor}, bilinear back"),
                        ("ceiling", "release head ceiling (least squares)")):
        print(f"  {label:45s} PSNR {result['PSNR_' + name]:6.2f} dB  SSIM {result['SSIM_' + name]:.4f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
