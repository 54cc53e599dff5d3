"""Deformable encoder (Deformable-DETR / DINO), post-norm.

The layer takes the tokens to update (``query``) and the tokens to sample from (``value``)
separately. The plain encoder passes the same tensor for both; saliency-driven token selection
(Salience-DETR; `salient_encoder.py`) passes only the selected tokens as ``query`` (with their own
positions and reference points) and the original neck features as ``value``.
"""
from typing import Optional

import torch
from torch import nn

from ...layers.ms_deform_attn import MSDeformAttn, SpatialShapes, as_int_shapes


class FeedForward(nn.Module):
    """Linear -> ReLU -> Linear with dropout, then residual and LayerNorm (post-norm)."""

    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(ffn_dim, embed_dim), nn.Dropout(dropout),
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.layers(x))


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention (residual + LN) followed by the FFN (residual + LN).
    ``deform_impl`` / ``deform_compile``: ``impl`` / ``compile`` of its :class:`MSDeformAttn`."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 ffn_dim: int = 2048, dropout: float = 0.0, deform_impl: str = "auto", deform_compile: bool = False):
        super().__init__()
        self.self_attn = MSDeformAttn(embed_dim, num_heads, num_levels, num_points,
                                      impl=deform_impl, compile=deform_compile)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                value: torch.Tensor, spatial_shapes: SpatialShapes,
                value_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            query: (B, Q, C) tokens to update (all tokens, or a selected subset).
            query_pos: (B, Q, C) their position + level embeddings.
            reference_points: (B, Q, L, 2) their centres on every level (valid-ratio scaled).
            value: (B, S, C) the full flattened multi-scale map to sample from.
            value_padding_mask: (B, S) True at padding.
        Returns:
            (B, Q, C) updated tokens.
        """
        attended = self.self_attn(query + query_pos, reference_points, value, spatial_shapes, value_padding_mask)
        query = self.norm(query + self.dropout(attended))
        return self.ffn(query)


def encoder_reference_points(spatial_shapes: SpatialShapes, valid_ratios: torch.Tensor) -> torch.Tensor:
    """Every token's pixel centre, normalised by the valid (unpadded) extent of its own level and
    then expressed on every level: (B, S, L, 2) for valid_ratios (B, L, 2) as (w, h) ratios."""
    device = valid_ratios.device
    points = []
    for level, (height, width) in enumerate(as_int_shapes(spatial_shapes)):
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device) + 0.5,
                                torch.arange(width, dtype=torch.float32, device=device) + 0.5, indexing="ij")
        x = xs.reshape(1, -1) / (valid_ratios[:, None, level, 0] * width)
        y = ys.reshape(1, -1) / (valid_ratios[:, None, level, 1] * height)
        points.append(torch.stack([x, y], dim=-1))
    points = torch.cat(points, dim=1)  # (B, S, 2) in units of the valid image
    return points[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer`; each layer samples from its own input."""

    def __init__(self, num_layers: int = 6, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, spatial_shapes: SpatialShapes,
                valid_ratios: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """src, pos (B, S, C) flattened tokens and embeddings; valid_ratios (B, L, 2) -> memory (B, S, C)."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, value=out, spatial_shapes=spatial_shapes,
                        value_padding_mask=padding_mask)
        return out
