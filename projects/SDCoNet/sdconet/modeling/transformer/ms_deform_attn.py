"""Multi-scale deformable attention (Deformable-DETR) written with ``F.grid_sample`` only.

No compiled kernel: the same code runs on CPU and GPU, which keeps the project installable
anywhere. A faster kernel can later be dispatched from :func:`multi_scale_deformable_attention`
without touching the callers.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

SpatialShapes = Union[torch.Tensor, Sequence[Tuple[int, int]]]


def as_int_shapes(spatial_shapes: SpatialShapes):
    """(h, w) of every level as Python ints: one host transfer for a tensor, none for a list."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def multi_scale_deformable_attention(value, spatial_shapes, sampling_locations, attention_weights):
    """Weighted sum of bilinear samples taken on every level of a flattened feature pyramid.

    Args:
        value: (B, S, H, Dh), the levels flattened row-major and concatenated, S = sum(h*w).
        spatial_shapes: (L, 2) LongTensor or list of (h, w).
        sampling_locations: (B, Q, H, L, P, 2), normalised (x, y); pixel centres lie at
            (i + 0.5) / w (``align_corners=False``); samples outside the map read zeros.
        attention_weights: (B, Q, H, L, P).
    Returns:
        (B, Q, H * Dh).
    """
    shapes = as_int_shapes(spatial_shapes)
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if len(shapes) != num_levels:
        raise ValueError(f"{len(shapes)} spatial shapes for {num_levels} sampling levels")
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError(f"spatial shapes {shapes} do not add up to {value.shape[1]} value tokens")

    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1] and one image per (batch, head).
    grids = 2.0 * sampling_locations - 1.0
    output = None
    for level, (height, width) in enumerate(shapes):
        # (B, h*w, H, Dh) -> (B*H, Dh, h, w)
        level_value = value_per_level[level].permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, height, width)
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * num_heads, num_queries, num_points, 2)
        sampled = F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # (B, Q, H, P) -> (B*H, 1, Q, P); sum over points -> (B*H, Dh, Q)
        weights = attention_weights[:, :, :, level].transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_points)
        contribution = (sampled * weights).sum(-1)
        output = contribution if output is None else output + contribution
    # (B*H, Dh, Q) -> (B, Q, H*Dh)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Deformable attention: each query samples ``num_points`` locations per head and level
    around its reference point and mixes them with learned, query-dependent weights."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self):
        """Start with uniform weights over points that fan out radially, one direction per head,
        farther for higher point indices (Deformable-DETR initialisation)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        # Scale so the larger component is 1: the first point lands on a neighbouring pixel.
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        point_distance = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        bias = directions[:, None, None, :] * point_distance[None, None, :, None]
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: SpatialShapes,
        value_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Q, C), positional embedding already added.
            reference_points: (B, Q, L, 2) normalised (x, y) points, or (B, Q, L, 4) boxes
                (cx, cy, w, h); with boxes the offsets are scaled by the box size.
            value: (B, S, C) flattened multi-scale features.
            spatial_shapes: (L, 2) LongTensor or list of (h, w).
            value_padding_mask: (B, S) bool, True at padding (those values read as zero).
        Returns:
            (B, Q, C).
        """
        shapes = as_int_shapes(spatial_shapes)
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if len(shapes) != levels:
            raise ValueError(f"MSDeformAttn built for {levels} levels, got {len(shapes)} spatial shapes")

        projected_value = self.value_proj(value)
        if value_padding_mask is not None:
            projected_value = projected_value.masked_fill(value_padding_mask[..., None], 0.0)
        projected_value = projected_value.view(batch, value.shape[1], heads, self.embed_dim // heads)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weight_logits = self.attention_weights(query).view(batch, num_queries, heads, levels * points)

        # Sampling positions must stay precise (a bf16 coordinate is off by pixels on large maps),
        # so locations, softmax and sampling run in fp32 whatever autocast says.
        out_dtype = projected_value.dtype
        with torch.autocast(device_type=query.device.type, enabled=False):
            offsets = offsets.float()
            reference_points = reference_points.float()
            weights = weight_logits.float().softmax(-1).view(batch, num_queries, heads, levels, points)
            if reference_points.shape[-1] == 2:
                # Offsets are in pixels of each level: divide by (w, h).
                level_sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=query.device)
                locations = reference_points[:, :, None, :, None, :] + offsets / level_sizes[None, None, None, :, None, :]
            elif reference_points.shape[-1] == 4:
                # Offsets are fractions of the half box size, spread over the points.
                centres = reference_points[:, :, None, :, None, :2]
                half_sizes = reference_points[:, :, None, :, None, 2:] * 0.5
                locations = centres + offsets / points * half_sizes
            else:
                raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")
            sampled = multi_scale_deformable_attention(projected_value.float(), shapes, locations, weights)
        return self.output_proj(sampled.to(out_dtype))
