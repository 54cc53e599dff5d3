"""Sine positional encodings: for feature maps (encoder) and for normalised boxes (decoder queries)."""
import math

import torch
from torch import nn


def _sine_features(coords: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """(...,) positions -> (..., num_feats) interleaved sin/cos at geometric frequencies.

    Features 2i and 2i + 1 share a frequency, so each angle is computed once and both its sin and
    cos come from one contiguous pass (the same values as slicing every other feature).
    """
    even = torch.arange(0, num_feats, 2, dtype=torch.float32, device=coords.device)
    angles = coords[..., None].float() / temperature ** (even / num_feats)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """DETR-style 2-D sine encoding of (y, x), computed from the padding mask so that padded
    pixels do not shift the coordinates of valid ones.

    DINO's values are the defaults: temperature 20 and offset 0 (Deformable-DETR uses 10000 and -0.5).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 20, normalize: bool = True,
                 scale: float = 2 * math.pi, offset: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, H, W) bool, True at padding -> (B, 2 * num_pos_feats, H, W), y features first."""
        valid = (~mask).float()
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        pos = _sine_features(torch.stack([y, x], dim=-1), self.num_pos_feats, self.temperature).flatten(-2)
        return pos.permute(0, 3, 1, 2).contiguous()


def box_sine_embedding(boxes: torch.Tensor, num_feats: int = 128, temperature: float = 10000,
                       scale: float = 2 * math.pi) -> torch.Tensor:
    """Normalised points (..., 2) as (x, y) or boxes (..., 4) as (cx, cy, w, h) ->
    (..., num_feats * 2 or 4), ordered y, x[, w, h] like the feature-map encoding."""
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"expected 2 or 4 coordinates, got {boxes.shape[-1]}")
    order = [1, 0, 2, 3][: boxes.shape[-1]]
    # All coordinates in one pass: (..., k) -> (..., k, num_feats) -> (..., k * num_feats).
    return _sine_features(boxes[..., order] * scale, num_feats, temperature).flatten(-2)
