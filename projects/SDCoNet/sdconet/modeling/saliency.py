"""Multi-scale saliency prediction and its box-derived supervision (Salience-DETR style).

The predictor scores every neck token with a logit "how likely is this token the centre of an
object of this level's size". Scores flow top-down: the coarse level's logits, upsampled, modulate
the next finer level's tokens before that level is scored. Token selection uses the scores; it
lives in ``transformer/salient_encoder.py``. The method: docs/method.md, Saliency and token selection.

Conventions used throughout:

* Levels are ordered fine -> coarse (level 0 = stride 8 on the LR input), like the neck.
* Padding masks are bool with ``True`` = padded token (detectron2 / DETR convention).
* Boxes are ``xyxy`` in HR pixels; strides are HR pixels per feature cell (HR size / feature size).
"""
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# Object-size ranges (max distance from token centre to a box side, HR px) of levels 0..3.
DEFAULT_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, math.inf))


def _init_linear(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear inside ``module`` (as the release)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


class MaskPredictor(nn.Module):
    """Per-token saliency logit from a local half and a level-wide (global) half of the features.

    The global half is averaged over the level's valid tokens only, so the amount of padding in a
    batch does not change a real token's score.
    """

    def __init__(self, dim: int = 256, hidden: Optional[int] = None):
        super().__init__()
        hidden = dim if hidden is None else hidden
        if hidden % 4:
            raise ValueError(f"MaskPredictor hidden width must be divisible by 4, got {hidden}")
        self.hidden = hidden
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU())
        self.head = nn.Sequential(
            nn.Linear(hidden, hidden // 2), nn.GELU(),
            nn.Linear(hidden // 2, hidden // 4), nn.GELU(),
            nn.Linear(hidden // 4, 1),
        )
        _init_linear(self)

    def forward(self, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, N, dim), padding_mask (B, N) or None -> logits (B, N)."""
        z = self.embed(tokens)
        z_local, z_global = z.split(self.hidden // 2, dim=-1)
        if padding_mask is None:
            pooled = z_global.mean(dim=1, keepdim=True)
        else:
            valid = (~padding_mask).unsqueeze(-1).to(z.dtype)
            pooled = (z_global * valid).sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1.0)
        z = torch.cat([z_local, pooled.expand_as(z_global)], dim=-1)
        return self.head(z).squeeze(-1)


class SaliencyOutput(NamedTuple):
    """Per-level saliency, each (B, H_l, W_l).

    ``logits``: raw predictions; the loss uses these for every token, padded ones included, as the
    release does.
    ``scores``: the same logits with padded tokens set to a very low value (the level's smallest
    logit minus 1, detached), so a top-k for token selection ranks them strictly after every valid
    token while the value stays finite and on the logits' scale.
    """

    logits: List[torch.Tensor]
    scores: List[torch.Tensor]


class SaliencyPredictor(nn.Module):
    """Top-down multi-scale saliency: coarse logits modulate the finer level's tokens.

    ``alpha="learnable"``: a trained (num_levels-1)-vector initialised U(-0.3, 0.3) (Salience-DETR).
    ``alpha="fixed"``: all ones, a non-persistent buffer that is never trained (the release's
    gradient-routing variant). Non-persistent so that loading a learnable-alpha checkpoint cannot
    silently overwrite the fixed value.
    """

    def __init__(self, dim: int = 256, num_levels: int = 4, alpha: str = "learnable", hidden: Optional[int] = None):
        super().__init__()
        if alpha not in ("learnable", "fixed"):
            raise ValueError(f"alpha must be 'learnable' or 'fixed', got {alpha!r}")
        self.num_levels = num_levels
        self.mask_predictor = MaskPredictor(dim, hidden)
        if alpha == "learnable":
            self.alpha = nn.Parameter(torch.empty(num_levels - 1).uniform_(-0.3, 0.3))
        else:
            self.register_buffer("alpha", torch.ones(num_levels - 1), persistent=False)

    def forward(self, level_tokens: Sequence[torch.Tensor], spatial_shapes: Sequence[Tuple[int, int]],
                padding_masks: Optional[Sequence[Optional[torch.Tensor]]] = None) -> SaliencyOutput:
        """Score the levels from the coarsest to the finest.

        level_tokens: per level (B, H_l*W_l, dim), already ``LN(Linear(feat + pos))`` by the caller.
        spatial_shapes: per level (H_l, W_l) (ints or a (L, 2) tensor).
        padding_masks: per level (B, H_l, W_l) or (B, H_l*W_l) bool, True = padded; None = no padding.
        """
        if len(level_tokens) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels, got {len(level_tokens)}")
        shapes = [(int(h), int(w)) for h, w in spatial_shapes]
        masks = list(padding_masks) if padding_masks is not None else [None] * self.num_levels
        logits: List[Optional[torch.Tensor]] = [None] * self.num_levels
        scores: List[Optional[torch.Tensor]] = [None] * self.num_levels
        coarser = None
        for level in range(self.num_levels - 1, -1, -1):
            tokens = level_tokens[level]
            batch, (height, width) = tokens.shape[0], shapes[level]
            mask = masks[level].reshape(batch, height * width) if masks[level] is not None else None
            if coarser is not None:
                upsampled = F.interpolate(coarser.unsqueeze(1), size=(height, width), mode="bilinear",
                                          align_corners=True).reshape(batch, height * width, 1)
                tokens = tokens + self.alpha[level] * tokens * upsampled
            flat = self.mask_predictor(tokens, mask)
            coarser = flat.reshape(batch, height, width)
            logits[level] = coarser
            if mask is None:
                scores[level] = coarser
            else:
                floor = flat.detach().min() - 1.0
                # torch.where, not masked_fill: a tensor fill value is read on the host (a CUDA sync).
                scores[level] = torch.where(mask, floor, flat).reshape(batch, height, width)
        return SaliencyOutput(logits, scores)


def flatten_levels(per_level: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level (B, H_l, W_l) maps -> (B, sum H_l*W_l), level 0 first (the memory's token order)."""
    return torch.cat([x.flatten(1) for x in per_level], dim=1)


def split_levels(flat: torch.Tensor, spatial_shapes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """Inverse of :func:`flatten_levels`: (B, sum H_l*W_l) -> per-level (B, H_l, W_l)."""
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    chunks = flat.split([h * w for h, w in shapes], dim=1)
    return [c.reshape(flat.shape[0], h, w) for c, (h, w) in zip(chunks, shapes)]


def _stride_pair(stride: Union[float, Sequence[float]]) -> Tuple[float, float]:
    """A stride given as a number or as (stride_y, stride_x)."""
    if isinstance(stride, (int, float)):
        return float(stride), float(stride)
    stride_y, stride_x = stride
    return float(stride_y), float(stride_x)


@torch.no_grad()
def saliency_targets(gt_boxes_per_image: Sequence[torch.Tensor], image_sizes_hr: Sequence[Tuple[int, int]],
                     level_shapes: Sequence[Tuple[int, int]],
                     level_strides_hr: Sequence[Union[float, Tuple[float, float]]],
                     ranges: Sequence[Tuple[float, float]] = DEFAULT_RANGES) -> List[torch.Tensor]:
    """Soft box-centredness targets per level, (B, H_l, W_l) each (Salience-DETR).

    A token (row i, column j) sits at ((j+0.5)*stride_x, (i+0.5)*stride_y) HR px. It is positive for
    a box when it lies strictly inside it and max(l, t, r, b) is in the level's range (lo, hi];
    its value is 1 - 0.5*sqrt(dx^2 + dy^2), dx = (l-r)/(l+r), dy = (t-b)/(t+b): 1 at the centre.
    As in the release, the value is the max over *all* containing boxes, kept only where at least
    one containing box matches the level's range.

    gt_boxes_per_image: per image (M, 4) xyxy in HR px; boxes are clipped to that image's
    image_sizes_hr (height, width) first. level_strides_hr: per level a number or (stride_y, stride_x).
    """
    if not len(level_shapes) == len(level_strides_hr) == len(ranges):
        raise ValueError("level_shapes, level_strides_hr and ranges must have one entry per level")
    targets = []
    for (height, width), stride, (low, high) in zip(level_shapes, level_strides_hr, ranges):
        stride_y, stride_x = _stride_pair(stride)
        per_image = []
        for boxes, (img_h, img_w) in zip(gt_boxes_per_image, image_sizes_hr):
            boxes = boxes.detach().float()
            device = boxes.device
            if boxes.numel() == 0:
                per_image.append(torch.zeros(int(height), int(width), device=device))
                continue
            boxes = torch.stack([boxes[:, 0].clamp(0, img_w), boxes[:, 1].clamp(0, img_h),
                                 boxes[:, 2].clamp(0, img_w), boxes[:, 3].clamp(0, img_h)], dim=1)
            ys = (torch.arange(int(height), device=device, dtype=torch.float32) + 0.5) * stride_y
            xs = (torch.arange(int(width), device=device, dtype=torch.float32) + 0.5) * stride_x
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            cx, cy = cx.reshape(-1, 1), cy.reshape(-1, 1)  # (HW, 1) against (M,) boxes
            left, top = cx - boxes[:, 0], cy - boxes[:, 1]
            right, bottom = boxes[:, 2] - cx, boxes[:, 3] - cy
            sides = torch.stack([left, top, right, bottom], dim=-1)  # (HW, M, 4)
            inside = sides.min(dim=-1).values > 0
            largest = sides.max(dim=-1).values
            in_range = inside & (largest > low) & (largest <= high)
            dx = (left - right) / (left + right)
            dy = (top - bottom) / (top + bottom)
            value = torch.where(inside, 1.0 - 0.5 * torch.sqrt(dx**2 + dy**2), torch.zeros_like(dx))
            value = value.max(dim=1).values * in_range.any(dim=1)
            per_image.append(value.reshape(int(height), int(width)))
        targets.append(torch.stack(per_image))
    return targets


def saliency_loss(logits_flat: torch.Tensor, targets_flat: torch.Tensor,
                  alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal-weighted BCE with soft targets, summed over all tokens, divided by num_pos.

    weight = (1-alpha)*p^gamma*(1-t) + alpha*t*(1-p)^gamma keeps its gradient, as in the release.
    num_pos = tokens with target > 0, averaged over ranks under torch.distributed (like the DINO
    losses' box count), clamped to >= 1 so a batch without positives still gives a finite loss.
    The caller applies the loss weight (MODEL.SDCONET.SALIENCY.LOSS_WEIGHT).
    """
    targets = targets_flat.to(logits_flat.dtype)
    prob = logits_flat.sigmoid()
    weight = (1 - alpha) * prob**gamma * (1 - targets) + alpha * targets * (1 - prob) ** gamma
    bce = F.binary_cross_entropy_with_logits(logits_flat, targets, reduction="none")
    num_pos = (targets_flat > 0).sum().to(logits_flat.dtype)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_pos)
        num_pos = num_pos / dist.get_world_size()
    return (weight * bce).sum() / num_pos.clamp(min=1.0)
