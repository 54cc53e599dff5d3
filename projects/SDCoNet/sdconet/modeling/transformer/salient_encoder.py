"""Saliency-driven token selection in the deformable encoder (Salience-DETR design).

Only the tokens that the saliency predictor ranks highest are updated, so the encoder's cost
scales with the number of *selected* tokens, not with the image size:

1. level filter: on level l keep the top ``floor(valid_l * level_ratio_l)`` tokens by saliency;
   the kept tokens of all levels are sorted by score, best first (equal scores: lower flat index
   first, in eager runs and in the ONNX graph alike);
2. layer filter: encoder layer i updates only the first ``floor(N_sel * layer_ratio_i)`` of them;
3. in each layer, a pre-attention (Focus-DETR "dual attention") lets the ``topk_sa`` best of
   those tokens attend to each other, then deformable attention samples the *original* neck
   features (the value is never updated), then the FFN. "Best" is the max class logit times the
   saliency logit (``pre_attention_score="logit_product"``, the release) or the product of the
   two probabilities (``"sigmoid"``); padded tokens rank last and are masked out as keys;
4. unselected (background) tokens keep their neck features plus a learned background embedding.

All ratios 1.0 reproduce the release, which selects nothing away. The method: docs/method.md,
Saliency and token selection.
"""
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .encoder import DeformableEncoderLayer, encoder_reference_points
from ...layers.ms_deform_attn import SpatialShapes, as_int_shapes


class TokenSelection(NamedTuple):
    """Selected token indices into the flattened memory, best first.

    ``indices`` (B, K): the same K for every image, per level the batch maximum of
    ``floor(valid * ratio)`` (as in Salience-DETR), so an image with more padding than another
    fills its quota with padded tokens; those are never written back.
    ``per_level`` and ``per_layer``: the K split by level and the prefix length of every layer.
    ``padded``: whether any image of the batch has padding (known on the host at no extra cost).
    """

    indices: torch.Tensor
    per_level: List[int]
    per_layer: List[int]
    padded: bool = False


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores along dim 1, best first, equal scores in index order.

    Ties are common: the tokens that the proposals mask out (the outer rows and columns of a level
    more than 50 tokens across) get one saliency, up to rounding. ``topk`` orders ties as its
    kernel happens to, so eager runs use a stable sort; ONNX TopK breaks ties by the lower index,
    and it is what the exported graph uses (the ONNX exporter has no stable sort).
    """
    if torch.onnx.is_in_onnx_export():
        return scores.topk(k, dim=1, largest=True, sorted=True).indices
    return scores.argsort(dim=1, descending=True, stable=True)[:, :k]


def select_salient_tokens(scores: torch.Tensor, padding: torch.Tensor, spatial_shapes: SpatialShapes,
                          level_ratios: Sequence[float], layer_ratios: Sequence[float]) -> TokenSelection:
    """Level then layer filtering of flattened tokens.

    Args:
        scores: (B, S) saliency logits, level 0 first; padded tokens must already rank last.
        padding: (B, S) bool, True at padding.
        level_ratios: fraction of each level's valid tokens to keep (0, 1].
        layer_ratios: per encoder layer, fraction of the kept tokens it updates (0, 1].
    """
    shapes = as_int_shapes(spatial_shapes)
    if len(level_ratios) != len(shapes):
        raise ValueError(f"{len(level_ratios)} level ratios for {len(shapes)} levels")
    sizes = [h * w for h, w in shapes]
    # Tokens kept per level: the most any image keeps. topk needs them as ints, so the valid counts
    # of all levels come to the host in one transfer (one device sync per forward, not one per
    # level); the floor is taken there in float64, exact for any count.
    valid = torch.stack([level.sum(1) for level in (~padding).split(sizes, dim=1)], dim=1).tolist()  # (B, L)
    per_level = [max((math.floor(counts[level] * ratio) for counts in valid), default=0)
                 for level, ratio in enumerate(level_ratios)]
    chosen, chosen_scores = [], []
    start = 0
    for size, keep in zip(sizes, per_level):
        level_scores = scores[:, start:start + size]
        top_index = top_indices(level_scores, keep)
        chosen.append(top_index + start)
        chosen_scores.append(level_scores.gather(1, top_index))
        start += size
    indices = torch.cat(chosen, 1)
    # Ties keep the level order, then the index order within a level: the flat index order.
    order = top_indices(torch.cat(chosen_scores, 1), indices.shape[1])
    indices = indices.gather(1, order)
    total = indices.shape[1]
    per_layer = [int(total * ratio) for ratio in layer_ratios]
    padded = any(sum(counts) < sum(sizes) for counts in valid)
    return TokenSelection(indices, per_level, per_layer, padded)


PRE_ATTENTION_SCORES = ("logit_product", "sigmoid")


def pre_attention_score(class_logits: torch.Tensor, saliency: torch.Tensor, mode: str = "logit_product"
                        ) -> torch.Tensor:
    """Ranking score of tokens for the pre-attention, from (B, K, classes) logits and (B, K) saliency.

    ``logit_product``: max class logit x saliency logit, as the release. Two negative logits give a
    large positive product, so confidently empty tokens can outrank objects. ``sigmoid``: the
    product of the two probabilities, which grows only when both say "object".
    """
    best = class_logits.max(-1).values
    if mode == "logit_product":
        return best * saliency
    if mode == "sigmoid":
        return best.sigmoid() * saliency.sigmoid()
    raise ValueError(f"pre_attention_score must be one of {PRE_ATTENTION_SCORES}, got {mode!r}")


class LearnedPositionEmbedding(nn.Module):
    """Row and column embeddings (``num_embeddings`` each, ``dim/2`` wide), concatenated: the
    background embedding of tokens the encoder does not update (200 entries, as the release)."""

    def __init__(self, dim: int, num_embeddings: int = 200):
        super().__init__()
        if dim % 2:
            raise ValueError(f"background embedding width must be even, got {dim}")
        self.row = nn.Embedding(num_embeddings, dim // 2)
        self.col = nn.Embedding(num_embeddings, dim // 2)
        nn.init.uniform_(self.row.weight)
        nn.init.uniform_(self.col.weight)

    def forward(self, height: int, width: int) -> torch.Tensor:
        """-> (height * width, dim), row-major like the flattened memory."""
        if max(height, width) > self.row.num_embeddings:
            raise ValueError(f"feature map {height}x{width} exceeds the {self.row.num_embeddings} background "
                             "embedding positions")
        rows = self.row.weight[:height]
        cols = self.col.weight[:width]
        grid = torch.cat([cols[None].expand(height, -1, -1), rows[:, None].expand(-1, width, -1)], dim=-1)
        return grid.reshape(height * width, -1)


class SalientEncoderLayer(DeformableEncoderLayer):
    """Pre-attention among the best ``topk_sa`` tokens, then the deformable layer."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, topk_sa: int = 100, dropout: float = 0.0,
                 **kwargs):
        super().__init__(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout, **kwargs)
        self.topk_sa = topk_sa
        self.pre_attention = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.pre_dropout = nn.Dropout(dropout)
        self.pre_norm = nn.LayerNorm(embed_dim)

    def pre_attention_indices(self, rank_score: torch.Tensor, padding: Optional[torch.Tensor] = None
                              ) -> torch.Tensor:
        """(B, k) positions of the ``topk_sa`` highest ``rank_score``; padded tokens (``padding`` True)
        come after every valid one, whatever their score."""
        k = min(self.topk_sa, rank_score.shape[1])
        if padding is not None:
            rank_score = rank_score.masked_fill(padding, float("-inf"))
        return rank_score.topk(k, dim=1).indices

    def pre_attend(self, query: torch.Tensor, query_pos: torch.Tensor, rank_score: torch.Tensor,
                   padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Self-attention among the ``topk_sa`` highest-ranked tokens; the others pass unchanged.

        ``padding`` (B, Q) True at padded tokens: they are picked only when an image has too few
        valid ones, and are never attended to (unless an image has no valid token among the picked).
        """
        if min(self.topk_sa, query.shape[1]) == 0:
            return query
        top = self.pre_attention_indices(rank_score, padding)
        index = top[..., None].expand(-1, -1, query.shape[-1])
        tokens = query.gather(1, index)
        q = tokens + query_pos.gather(1, index)
        key_padding_mask = None
        if padding is not None:
            key_padding_mask = padding.gather(1, top)
            # A row of only masked keys has no defined softmax: such an image attends to all its picks.
            key_padding_mask = key_padding_mask & ~key_padding_mask.all(1, keepdim=True)
        attended = self.pre_attention(q, q, tokens, key_padding_mask=key_padding_mask, need_weights=False)[0]
        tokens = self.pre_norm(tokens + self.pre_dropout(attended))
        return query.scatter(1, index, tokens)


class SalientDeformableEncoder(nn.Module):
    """Deformable encoder that updates only saliency-selected tokens (see the module docstring)."""

    def __init__(self, num_layers: int = 6, embed_dim: int = 256, level_ratios=(0.4, 0.8, 1.0, 1.0),
                 layer_ratios=(1.0, 0.8, 0.6, 0.6, 0.4, 0.2), topk_sa: int = 100,
                 pre_attention_score: str = "logit_product", **layer_kwargs):
        super().__init__()
        if len(layer_ratios) != num_layers:
            raise ValueError(f"{len(layer_ratios)} layer ratios for {num_layers} encoder layers")
        if pre_attention_score not in PRE_ATTENTION_SCORES:
            raise ValueError(f"pre_attention_score must be one of {PRE_ATTENTION_SCORES}, got {pre_attention_score!r}")
        # How the pre-attention ranks tokens: see pre_attention_score().
        self.pre_attention_score = pre_attention_score
        self.level_ratios = tuple(float(r) for r in level_ratios)
        self.layer_ratios = tuple(float(r) for r in layer_ratios)
        self.layers = nn.ModuleList(SalientEncoderLayer(embed_dim=embed_dim, topk_sa=topk_sa, **layer_kwargs)
                                    for _ in range(num_layers))
        self.background_embedding = LearnedPositionEmbedding(embed_dim)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, spatial_shapes: SpatialShapes,
                valid_ratios: torch.Tensor, padding_mask: torch.Tensor, saliency: torch.Tensor,
                scorer: nn.Module) -> Tuple[torch.Tensor, TokenSelection]:
        """
        Args:
            src, pos: (B, S, C) flattened neck features and their position + level embeddings.
            padding_mask: (B, S) True at padding; saliency: (B, S) scores, padded tokens ranked last.
            scorer: Linear(C -> classes) ranking tokens for pre-attention (the encoder class head,
                or the release's untrained stand-in).
        Returns:
            memory (B, S, C) and the selection (for inspection and tests).
        """
        shapes = as_int_shapes(spatial_shapes)
        selection = select_salient_tokens(saliency, padding_mask, shapes, self.level_ratios, self.layer_ratios)
        channels = src.shape[-1]
        reference_points = encoder_reference_points(shapes, valid_ratios)
        flat_refs = reference_points.flatten(2)  # (B, S, L*2)
        filler = padding_mask.gather(1, selection.indices)  # padded fillers are computed, never written back
        own = ~filler
        output = src
        for layer, keep in zip(self.layers, selection.per_layer):
            if keep == 0:
                continue
            index = selection.indices[:, :keep]
            expand = index[..., None].expand(-1, -1, channels)
            before = output.gather(1, expand)
            query_pos = pos.gather(1, expand)
            refs = flat_refs.gather(1, index[..., None].expand(-1, -1, flat_refs.shape[-1]))
            refs = refs.view(src.shape[0], keep, *reference_points.shape[2:])
            # Focus-DETR multi-category score x saliency; by default raw logits multiplied, as in the release.
            with torch.no_grad():
                rank_score = pre_attention_score(scorer(before), saliency.gather(1, index), self.pre_attention_score)
            # Unpadded batches pass no mask at all: their attention runs exactly as without one.
            fillers = filler[:, :keep] if selection.padded else None
            query = layer.pre_attend(before, query_pos, rank_score, fillers)
            query = layer(query, query_pos, refs, value=src, spatial_shapes=shapes, value_padding_mask=padding_mask)
            query = torch.where(own[:, :keep, None], query, before)
            output = output.scatter(1, expand, query)

        background = torch.cat([self.background_embedding(h, w) for h, w in shapes], 0).to(output.dtype)
        background = background[None].expand(src.shape[0], -1, -1)
        selected = torch.zeros_like(padding_mask)
        selected.scatter_(1, selection.indices, own)
        background = background * (~(selected | padding_mask))[..., None].to(output.dtype)
        return output + background, selection
