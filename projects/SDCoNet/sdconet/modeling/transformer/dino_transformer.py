"""DINO transformer with its prediction heads (docs/method.md, DINO detector).

Deformable encoder -> two-stage mixed query selection (top-k encoder proposals give the
reference boxes, content queries are learned) -> contrastive denoising queries in training ->
DINO decoder with look-forward-twice box refinement -> per-layer class / box heads.
"""
import math
from typing import Dict, List, Optional

import torch
from torch import nn

from ...layers.ms_deform_attn import MSDeformAttn
from ...layers.position_encoding import PositionEmbeddingSine, box_sine_embedding
from ..saliency import SaliencyPredictor, flatten_levels
from .denoising import ContrastiveDenoising, inverse_sigmoid
from .encoder import DeformableEncoder, FeedForward
from .salient_encoder import SalientDeformableEncoder


def _xavier_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class DINODecoderLayer(nn.Module):
    """Self-attention among queries (masked for DN), deformable cross-attention to the memory,
    FFN; each followed by residual + LayerNorm. ``deform_impl`` / ``deform_compile``: ``impl`` /
    ``compile`` of the cross-attention's :class:`MSDeformAttn`."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 ffn_dim: int = 2048, dropout: float = 0.0, deform_impl: str = "auto", deform_compile: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MSDeformAttn(embed_dim, num_heads, num_levels, num_points,
                                       impl=deform_impl, compile=deform_compile)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout)

    def forward(self, query, query_pos, reference_points, memory, spatial_shapes, memory_padding_mask=None,
                self_attn_mask=None):
        """query, query_pos (B, Q, C); reference_points (B, Q, L, 4); memory (B, S, C)."""
        q = k = query + query_pos
        attended = self.self_attn(q, k, query, attn_mask=self_attn_mask, need_weights=False)[0]
        query = self.norm1(query + self.dropout1(attended))
        attended = self.cross_attn(query + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask)
        query = self.norm2(query + self.dropout2(attended))
        return self.ffn(query)


class DINODecoder(nn.Module):
    """Decoder layers that refine their reference boxes one after the other.

    Look-forward-twice: layer i moves its (detached) input box by ``box_heads[i]`` of its output;
    the next layer gets that box detached, while layer i+1's *prediction* is built on the
    un-detached one, so each box head is trained by its own layer's loss and the next one's.
    As in the released (mmdet) decoder, the refinement reads the layer output before the final
    LayerNorm while the losses read it after.
    """

    def __init__(self, num_layers: int = 6, embed_dim: int = 256, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DINODecoderLayer(embed_dim=embed_dim, **layer_kwargs) for _ in range(num_layers))
        self.ref_point_head = MLP(2 * embed_dim, embed_dim, embed_dim, 2)
        self.norm = nn.LayerNorm(embed_dim)
        self.embed_dim = embed_dim

    def forward(self, query, reference_boxes, memory, spatial_shapes, valid_ratios, memory_padding_mask,
                self_attn_mask, box_heads):
        """
        Args:
            query: (B, Q, C) content queries; reference_boxes: (B, Q, 4) sigmoid cxcywh, no grad.
            valid_ratios: (B, L, 2); box_heads: one per layer, giving inverse-sigmoid deltas.
        Returns:
            (hidden, base_boxes): per layer the normalised output (B, Q, C) and the box its
            prediction is relative to (layer 0: the input references; layer i: layer i-1's
            refined box, with its graph).
        """
        hidden, base_boxes = [], []
        base = reference_boxes
        box_ratios = torch.cat([valid_ratios, valid_ratios], dim=-1)[:, None]  # (B, 1, L, 4)
        for layer, box_head in zip(self.layers, box_heads):
            level_boxes = reference_boxes[:, :, None] * box_ratios  # (B, Q, L, 4)
            query_pos = self.ref_point_head(box_sine_embedding(level_boxes[:, :, 0], self.embed_dim // 2))
            query = layer(query, query_pos, level_boxes, memory, spatial_shapes, memory_padding_mask, self_attn_mask)
            refined = (box_head(query) + inverse_sigmoid(reference_boxes)).sigmoid()
            hidden.append(self.norm(query))
            base_boxes.append(base)
            base = refined
            reference_boxes = refined.detach()
        return hidden, base_boxes


class DINOTransformer(nn.Module):
    """Everything between the neck and the losses of DINO.

    ``forward`` returns sigmoid logits and normalised cxcywh boxes (relative to each image's
    unpadded size) for the last decoder layer, the auxiliary layers, the selected encoder
    proposals and, in training with targets, the denoising queries.

    With ``saliency_alpha`` set ("learnable" or "fixed"), a multi-scale saliency predictor scores
    the neck tokens and the encoder updates only the selected ones (docs/method.md, Saliency and
    token selection); the outputs then also hold the per-level saliency logits and the selection.
    ``shared_scorer=False`` ranks pre-attention tokens with a separate, never-trained Linear as
    the release does (docs/method.md, Differences from the authors' release); by default the
    trained encoder class head ranks them. ``pre_attention_score``: how that ranking combines the
    class and saliency logits, "logit_product" (the release) or "sigmoid" (product of probabilities).
    ``deform_impl`` / ``deform_compile`` go to every :class:`MSDeformAttn` as ``impl`` / ``compile``.
    """

    def __init__(self, num_classes: int, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4,
                 num_points: int = 4, enc_layers: int = 6, dec_layers: int = 6, ffn_dim: int = 2048,
                 dropout: float = 0.0, num_queries: int = 300, pos_temperature: float = 20,
                 dn_num_queries: int = 100, dn_label_noise: float = 0.5, dn_box_noise: float = 1.0,
                 saliency_alpha: Optional[str] = None, level_ratios=(0.4, 0.8, 1.0, 1.0),
                 layer_ratios=(1.0, 0.8, 0.6, 0.6, 0.4, 0.2), topk_sa: int = 100, shared_scorer: bool = True,
                 pre_attention_score: str = "logit_product", deform_impl: str = "auto", deform_compile: bool = False):
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even for the sine position encoding, got {embed_dim}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_queries = num_queries
        layer_kwargs = dict(num_heads=num_heads, num_levels=num_levels, num_points=num_points,
                            ffn_dim=ffn_dim, dropout=dropout, deform_impl=deform_impl, deform_compile=deform_compile)

        self.position_encoding = PositionEmbeddingSine(embed_dim // 2, temperature=pos_temperature, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(num_levels, embed_dim))
        self.saliency = None
        if saliency_alpha is None:
            self.encoder = DeformableEncoder(enc_layers, embed_dim=embed_dim, **layer_kwargs)
        else:
            self.saliency = SaliencyPredictor(embed_dim, num_levels, alpha=saliency_alpha)
            self.encoder = SalientDeformableEncoder(enc_layers, embed_dim, level_ratios=level_ratios,
                                                    layer_ratios=layer_ratios, topk_sa=topk_sa,
                                                    pre_attention_score=pre_attention_score, **layer_kwargs)
        self.unshared_scorer = None
        if saliency_alpha is not None and not shared_scorer:
            # The release's pre-attention scorer: a fresh Linear used only through a top-k, so it
            # never gets a gradient. Frozen, so optimisers and DDP do not wait for one.
            self.unshared_scorer = nn.Linear(embed_dim, num_classes)
            self.unshared_scorer.requires_grad_(False)
        # Two-stage: encoder tokens -> proposal features, scored by the last (encoder) heads.
        self.memory_proj = nn.Linear(embed_dim, embed_dim)
        self.memory_norm = nn.LayerNorm(embed_dim)
        self.query_embedding = nn.Embedding(num_queries, embed_dim)
        self.denoising = ContrastiveDenoising(num_classes, embed_dim, dn_num_queries, dn_label_noise, dn_box_noise)
        self.decoder = DINODecoder(dec_layers, embed_dim, **layer_kwargs)
        # Unshared heads: one per decoder layer, and the last one for the encoder proposals.
        self.class_heads = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in range(dec_layers + 1))
        self.box_heads = nn.ModuleList(MLP(embed_dim, embed_dim, 4, 3) for _ in range(dec_layers + 1))
        self.reset_parameters()

    def reset_parameters(self):
        for part in (self.encoder, self.decoder):
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if self.saliency is not None:
            self.saliency.mask_predictor.apply(_xavier_linear)
            nn.init.uniform_(self.encoder.background_embedding.row.weight)
            nn.init.uniform_(self.encoder.background_embedding.col.weight)
        nn.init.xavier_uniform_(self.memory_proj.weight)
        nn.init.zeros_(self.memory_proj.bias)
        nn.init.xavier_uniform_(self.query_embedding.weight)
        nn.init.normal_(self.level_embed)
        prior_bias = -math.log((1 - 0.01) / 0.01)  # every class starts at probability 0.01
        for head in self.class_heads:
            nn.init.constant_(head.bias, prior_bias)
        for head in self.box_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    @property
    def encoder_class_head(self) -> nn.Linear:
        """Scores encoder tokens; a saliency module may share it as its class predictor."""
        return self.class_heads[-1]

    # ------------------------------------------------------------------ helpers
    def flatten_inputs(self, features: List[torch.Tensor], masks: List[torch.Tensor]):
        """Flatten the levels: tokens (B, S, C), position + level embedding (B, S, C), padding (B, S),
        spatial shapes as Python ints, valid ratios (B, L, 2) as (w, h)."""
        if len(features) != self.num_levels or len(masks) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels and masks, got {len(features)} and {len(masks)}")
        tokens, positions, paddings, shapes, ratios = [], [], [], [], []
        for level, (feature, mask) in enumerate(zip(features, masks)):
            height, width = feature.shape[-2:]
            shapes.append((height, width))
            pos = self.position_encoding(mask).to(feature.dtype)
            tokens.append(feature.flatten(2).transpose(1, 2))
            positions.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].to(feature.dtype))
            paddings.append(mask.flatten(1))
            valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1).float() / height
            valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1).float() / width
            ratios.append(torch.stack([valid_w, valid_h], dim=-1))
        return (torch.cat(tokens, 1), torch.cat(positions, 1), torch.cat(paddings, 1), shapes,
                torch.stack(ratios, 1))

    def encoder_proposals(self, memory: torch.Tensor, padding: torch.Tensor, spatial_shapes, valid_ratios):
        """One proposal per token: its centre (normalised by the valid extent) with size 0.05 * 2**level.

        Returns proposal features LN(Linear(memory)) (zero input at unusable tokens), proposals
        (B, S, 4) in inverse-sigmoid space (+inf where unusable) and the usable mask (B, S):
        not padded and centre/size inside (0.01, 0.99).
        """
        proposals = []
        for level, (height, width) in enumerate(spatial_shapes):
            ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=memory.device) + 0.5,
                                    torch.arange(width, dtype=torch.float32, device=memory.device) + 0.5, indexing="ij")
            centre = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)[None]  # (1, hw, 2) in pixels
            ratio = valid_ratios[:, None, level]  # (B, 1, 2): scaled by Python numbers, not a tensor copied to the device
            valid_size = torch.stack([ratio[..., 0] * width, ratio[..., 1] * height], dim=-1)
            centre = centre / valid_size
            size = torch.full_like(centre, 0.05 * 2.0**level)
            proposals.append(torch.cat([centre, size], dim=-1))
        proposals = torch.cat(proposals, dim=1)
        usable = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~padding
        proposals = inverse_sigmoid(proposals, eps=1e-6).masked_fill(~usable[..., None], float("inf"))
        features = self.memory_norm(self.memory_proj(memory.masked_fill(~usable[..., None], 0.0)))
        return features, proposals, usable

    def predictions(self, hidden: torch.Tensor, base_boxes: torch.Tensor, layer: int) -> Dict[str, torch.Tensor]:
        boxes = (self.box_heads[layer](hidden) + inverse_sigmoid(base_boxes)).sigmoid()
        return {"pred_logits": self.class_heads[layer](hidden), "pred_boxes": boxes}

    # ------------------------------------------------------------------ forward
    def forward(self, features: List[torch.Tensor], masks: List[torch.Tensor],
                targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict:
        src, pos, padding, shapes, valid_ratios = self.flatten_inputs(features, masks)
        saliency, selection = None, None
        if self.saliency is None:
            memory = self.encoder(src, pos, shapes, valid_ratios, padding)
        else:
            # Saliency reads LN(Linear(feat + pos)) through the same projection as the proposals.
            sizes = [h * w for h, w in shapes]
            level_tokens = self.encoder_proposals(src + pos, padding, shapes, valid_ratios)[0].split(sizes, 1)
            saliency = self.saliency(level_tokens, shapes, padding.split(sizes, 1))
            scorer = self.encoder_class_head if self.unshared_scorer is None else self.unshared_scorer
            memory, selection = self.encoder(src, pos, shapes, valid_ratios, padding,
                                             flatten_levels(saliency.scores), scorer)

        # Mixed query selection: positions from the best encoder tokens, content learned.
        proposal_features, proposals, usable = self.encoder_proposals(memory, padding, shapes, valid_ratios)
        enc_logits = self.encoder_class_head(proposal_features)
        scores = enc_logits.detach().float().max(-1).values.masked_fill(~usable, float("-inf"))
        num_selected = min(self.num_queries, scores.shape[1])
        topk = scores.topk(num_selected, dim=1).indices  # (B, K)
        selected_features = torch.gather(proposal_features, 1, topk[..., None].expand(-1, -1, self.embed_dim))
        selected_logits = torch.gather(enc_logits, 1, topk[..., None].expand(-1, -1, self.num_classes))
        selected_unact = self.box_heads[-1](selected_features) + torch.gather(proposals, 1, topk[..., None].expand(-1, -1, 4))
        enc_outputs = {"pred_logits": selected_logits, "pred_boxes": selected_unact.sigmoid()}

        batch = src.shape[0]
        content = self.query_embedding.weight[:num_selected][None].expand(batch, -1, -1)
        reference_unact = selected_unact.detach()
        attn_mask, dn_meta = None, None
        if self.training and targets is not None:
            dn = self.denoising(targets, num_selected)
            if dn is None:
                # No object in the batch: keep the label embedding in the graph (zero gradient)
                # so that DDP without find_unused_parameters does not stall.
                content = content + 0.0 * self.denoising.label_embedding.weight.sum()
            else:
                dn_content, dn_reference, attn_mask, dn_meta = dn
                content = torch.cat([dn_content.to(content.dtype), content], dim=1)
                reference_unact = torch.cat([dn_reference.to(reference_unact.dtype), reference_unact], dim=1)

        hidden, base_boxes = self.decoder(content, reference_unact.sigmoid(), memory, shapes, valid_ratios,
                                          padding, attn_mask, self.box_heads)
        if self.training:
            layers = [self.predictions(h, b, i) for i, (h, b) in enumerate(zip(hidden, base_boxes))]
        else:  # inference reads the last layer only: skip the auxiliary heads
            layers = [self.predictions(hidden[-1], base_boxes[-1], len(hidden) - 1)]

        pad = dn_meta.pad_size if dn_meta is not None else 0
        matching = [{k: v[:, pad:] for k, v in out.items()} for out in layers]
        dn_outputs = [{k: v[:, :pad] for k, v in out.items()} for out in layers] if dn_meta is not None else None
        return {
            "pred_logits": matching[-1]["pred_logits"],
            "pred_boxes": matching[-1]["pred_boxes"],
            "aux_outputs": matching[:-1],
            "enc_outputs": enc_outputs,
            "dn_outputs": dn_outputs,
            "dn_meta": dn_meta,
            "saliency": saliency,
            "token_selection": selection,
            "spatial_shapes": shapes,
        }
