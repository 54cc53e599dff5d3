"""Sine positional encodings: for feature maps (encoder) and for normalised boxes (decoder queries)."""
import math

import torch
from torch import nn


def _sine_features(coords: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """(...,) positions -> (..., num_feats) interleaved sin/cos at geometric frequencies."""
    dim = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    frequencies = temperature ** (2 * torch.div(dim, 2, rounding_mode="floor") / num_feats)
    angles = coords[..., None].float() / frequencies
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)


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
        pos = torch.cat([_sine_features(y, self.num_pos_feats, self.temperature),
                         _sine_features(x, self.num_pos_feats, self.temperature)], dim=-1)
        return pos.permute(0, 3, 1, 2).contiguous()


def box_sine_embedding(boxes: torch.Tensor, num_feats: int = 128, temperature: float = 10000,
                       scale: float = 2 * math.pi) -> torch.Tensor:
    """Normalised points (..., 2) as (x, y) or boxes (..., 4) as (cx, cy, w, h) ->
    (..., num_feats * 2 or 4), ordered y, x[, w, h] like the feature-map encoding."""
    if boxes.shape[-1] not in (2, 4):
        raise ValueError(f"expected 2 or 4 coordinates, got {boxes.shape[-1]}")
    order = [1, 0, 2, 3][: boxes.shape[-1]]
    return torch.cat([_sine_features(boxes[..., i] * scale, num_feats, temperature) for i in order], dim=-1)
