"""PSNR / SSIM of the super-resolved image, the way SR papers report them.

Convention (matlab ``rgb2ycbcr``, as in the usual SR toolkits): metrics are computed on the
BT.601 luma of 8-bit-range RGB, Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 (Y in
[16, 235] for R, G, B in [0, 255]); no rounding of Y. SSIM is Wang et al.'s: 11x11 Gaussian
window with sigma 1.5, K1 = 0.01, K2 = 0.03, averaged over the positions where the window fits
(same numbers as skimage's ``gaussian_weights=True, use_sample_covariance=False``).
"""
import itertools
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

logger = logging.getLogger(__name__)

Y_OFFSET = 16.0
Y_WEIGHTS_RGB = (65.481, 128.553, 24.966)  # per unit of R, G, B in [0, 1]; Y on the 0-255 scale


def _as_rgb_chw(image, channel_order: str) -> torch.Tensor:
    """float64 (3, H, W) RGB from a (3, H, W) or (H, W, 3) array or tensor."""
    tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    if tensor.ndim != 3 or 3 not in (tensor.shape[0], tensor.shape[-1]):
        raise ValueError(f"expected a (3, H, W) or (H, W, 3) image, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] != 3:
        tensor = tensor.permute(2, 0, 1)
    tensor = tensor.to(torch.float64)
    if channel_order.upper() == "BGR":
        return tensor.flip(0)
    if channel_order.upper() != "RGB":
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    return tensor


def to_y_channel(image, channel_order: str = "BGR", data_range: float = 255.0) -> torch.Tensor:
    """(H, W) float64 BT.601 luma on the same scale as the input (16..235 for 0..255 input)."""
    rgb = _as_rgb_chw(image, channel_order) / data_range
    weights = torch.tensor(Y_WEIGHTS_RGB, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (Y_OFFSET + (rgb * weights).sum(0)) / 255.0 * data_range


def _y_pair(a, b, channel_order, data_range, crop_border):
    y_a = to_y_channel(a, channel_order, data_range)
    y_b = to_y_channel(b, channel_order, data_range).to(y_a.device)
    if y_a.shape != y_b.shape:
        raise ValueError(f"images differ in size: {tuple(y_a.shape)} vs {tuple(y_b.shape)}")
    if crop_border > 0:  # SR convention: drop `scale` pixels on each side before measuring
        y_a = y_a[crop_border:-crop_border, crop_border:-crop_border]
        y_b = y_b[crop_border:-crop_border, crop_border:-crop_border]
    return y_a, y_b


def psnr_y(a, b, data_range: float = 255.0, crop_border: int = 0, channel_order: str = "BGR") -> float:
    """PSNR (dB) of the Y channels; ``inf`` for identical images (zero error)."""
    y_a, y_b = _y_pair(a, b, channel_order, data_range, crop_border)
    mse = torch.mean((y_a - y_b) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    window = torch.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def ssim_y(a, b, data_range: float = 255.0, crop_border: int = 0, channel_order: str = "BGR",
           window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM of the Y channels over the positions where the whole window fits; 1 for identical images."""
    y_a, y_b = _y_pair(a, b, channel_order, data_range, crop_border)
    if min(y_a.shape) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got {tuple(y_a.shape)}")
    window = _gaussian_window(window_size, sigma, y_a)
    rows, cols = window.view(1, 1, 1, -1), window.view(1, 1, -1, 1)

    def local_mean(x):  # separable Gaussian, 'valid' positions only
        return F.conv2d(F.conv2d(x[None, None], rows), cols)[0, 0]

    mu_a, mu_b = local_mean(y_a), local_mean(y_b)
    var_a = local_mean(y_a * y_a) - mu_a**2
    var_b = local_mean(y_b * y_b) - mu_b**2
    cov = local_mean(y_a * y_b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean().item()


def _mean_finite(values) -> float:
    """Mean over finite values; ``inf`` when every value is infinite (all images reproduced exactly)."""
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        return float(np.mean(finite))
    return math.inf if values else math.nan


class SRQualityEvaluator(DatasetEvaluator):
    """PSNR/SSIM (Y channel) of the model's SR output and of plain bicubic upsampling, vs the HR image.

    Reads ``input["image"]`` (HR, (3, H, W) uint8 BGR) and ``output["sr"]`` ((3, H, W) float BGR,
    0-255) and ``output["lr"]`` ((3, h, w) float BGR, 0-255). Bicubic is the baseline the SR branch
    has to beat. Both SR and bicubic images are clamped to [0, 255] and, with ``quantize``, rounded
    like a saved 8-bit image. Returns ``{"sr_quality": {"PSNR_SR", "SSIM_SR", "PSNR_bicubic",
    "SSIM_bicubic", "PSNR_gain", "SSIM_gain"}}`` averaged over images (gain = SR minus bicubic);
    PSNR is averaged over finite values only (an exact reconstruction has infinite PSNR).
    """

    def __init__(self, distributed: bool = True, crop_border: int = 0, quantize: bool = True):
        self._distributed = distributed
        self._crop_border = crop_border
        self._quantize = quantize
        self.reset()

    def reset(self):
        self._per_image = []

    def _to_8bit_range(self, image: torch.Tensor) -> torch.Tensor:
        image = image.clamp(0, 255)
        return image.round() if self._quantize else image

    def process(self, inputs, outputs):
        for input, output in zip(inputs, outputs):
            missing = [key for key in ("sr", "lr") if key not in output]
            if missing:
                raise KeyError(f"SRQualityEvaluator needs output[{missing[0]!r}]: build the model with its SR "
                               "branch enabled and run it inside model.outputs(sr=True).")
            sr = output["sr"].detach().to(torch.float64)
            hr = input["image"].to(device=sr.device, dtype=torch.float64)
            if sr.shape != hr.shape:
                raise ValueError(f"output['sr'] has shape {tuple(sr.shape)} but the HR image has {tuple(hr.shape)}")
            lr = output["lr"].detach().to(device=sr.device, dtype=torch.float64)
            bicubic = F.interpolate(lr[None], size=hr.shape[-2:], mode="bicubic", align_corners=False)[0]
            sr, bicubic = self._to_8bit_range(sr), self._to_8bit_range(bicubic)
            border = self._crop_border
            self._per_image.append({
                "PSNR_SR": psnr_y(sr, hr, crop_border=border),
                "SSIM_SR": ssim_y(sr, hr, crop_border=border),
                "PSNR_bicubic": psnr_y(bicubic, hr, crop_border=border),
                "SSIM_bicubic": ssim_y(bicubic, hr, crop_border=border),
            })

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            per_image = list(itertools.chain(*comm.gather(self._per_image, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            per_image = self._per_image
        if not per_image:
            logger.warning("[SRQualityEvaluator] no images were processed.")
            return {}
        results = {}
        for key in ("PSNR_SR", "SSIM_SR", "PSNR_bicubic", "SSIM_bicubic"):
            values = [m[key] for m in per_image]
            results[key] = _mean_finite(values) if key.startswith("PSNR") else float(np.mean(values))
        # What the SR branch adds over doing nothing (positive = better than bicubic).
        results["PSNR_gain"] = results["PSNR_SR"] - results["PSNR_bicubic"]
        results["SSIM_gain"] = results["SSIM_SR"] - results["SSIM_bicubic"]
        logger.info(f"SR quality on {len(per_image)} images (Y channel, crop_border={self._crop_border}): "
                    + ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
        return {"sr_quality": results}
