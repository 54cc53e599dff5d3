"""Batched on-device degradation of a normalised HR batch into the low-quality LR input.

Done inside the model (as the authors do) so the HR target and the LR input can never drift
apart, and on the device so it costs no data-loader time (docs/method.md, Degradation).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur


class Degradation(nn.Module):
    """HR (B,3,H,W) normalised -> LR (B,3,H/s,W/s): optional Gaussian blur, down-sampling, noise.

    Args:
        scale: down-sampling factor s in {1, 2, 4}; H and W must be multiples of s.
        mode: interpolation used to shrink ("bicubic" is the benchmark protocol).
        blur_sigma: (low, high) Gaussian sigma range in HR pixels, drawn per image.
        noise_std: (low, high) std range of additive Gaussian noise in 0-255 pixel units, per image.
        pixel_std: per-channel std used to normalise the input, so noise is added in pixel units.
        seed: seed of the blur/noise generator; < 0 uses torch's global RNG.
    """

    def __init__(self, scale=2, mode="bicubic", blur_sigma=(0.0, 0.0), noise_std=(0.0, 0.0),
                 pixel_std=(1.0, 1.0, 1.0), seed=-1):
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"Degradation scale must be 1, 2 or 4, got {scale}")
        self.scale = int(scale)
        self.mode = mode
        self.blur_sigma = tuple(float(v) for v in blur_sigma)
        self.noise_std = tuple(float(v) for v in noise_std)
        self.seed = int(seed)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1), False)
        self._generators = {}

    @property
    def is_identity(self) -> bool:
        return self.scale == 1 and self.blur_sigma[1] == 0 and self.noise_std[1] == 0

    def _generator(self, device):
        """A seeded generator per device, so runs repeat exactly; None = global RNG."""
        if self.seed < 0:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def _uniform(self, low, high, n, device, gen):
        return low + (high - low) * torch.rand(n, device=device, generator=gen)

    def forward(self, hr: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return hr
        b, _, h, w = hr.shape
        if h % self.scale or w % self.scale:
            raise ValueError(f"HR batch size {h}x{w} is not a multiple of the degradation scale {self.scale}")
        gen = self._generator(hr.device)
        x = hr
        if self.blur_sigma[1] > 0:
            sigmas = self._uniform(*self.blur_sigma, b, hr.device, gen).tolist()  # one host sync per batch
            x = torch.stack([self._blur(img, s) for img, s in zip(x, sigmas)])
        if self.scale > 1:
            size = (h // self.scale, w // self.scale)
            if self.mode == "area":
                x = F.interpolate(x, size=size, mode="area")
            else:
                x = F.interpolate(x, size=size, mode=self.mode, align_corners=False)
        if self.noise_std[1] > 0:
            std = self._uniform(*self.noise_std, b, hr.device, gen).view(b, 1, 1, 1)
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=gen)
            x = x + noise * std.to(x.dtype) / self.pixel_std.to(x.dtype)
        return x

    @staticmethod
    def _blur(img, sigma):
        if sigma <= 0:
            return img
        k = 2 * math.ceil(3 * sigma) + 1
        return gaussian_blur(img, [k, k], [sigma, sigma])


def build_degradation(cfg, pixel_std=None) -> Degradation:
    """The degradation of ``cfg.MODEL.SDCONET.DEGRADE``, adding noise in ``cfg.MODEL.PIXEL_STD`` units
    (the model's normalised input), or in ``pixel_std`` units when given ((1, 1, 1): 0-255 pixels)."""
    d = cfg.MODEL.SDCONET.DEGRADE
    std = tuple(cfg.MODEL.PIXEL_STD) if pixel_std is None else tuple(pixel_std)
    return Degradation(d.SCALE, d.MODE, tuple(d.BLUR_SIGMA), tuple(d.NOISE_STD), std, d.SEED)
