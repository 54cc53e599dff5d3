"""Contrastive denoising (CDN) queries of DINO.

Every ground-truth box is fed to the decoder several times with noise, as a *positive* query
(small noise: it must be reconstructed) and a *negative* one (larger noise: it must be called
background). The decoder's self-attention mask keeps the groups, and the matching queries,
from seeing each other's answers.

Layout of the DN part of the decoder queries, per image, with M = max targets in the batch::

    [ group 0: M positives | M negatives ][ group 1: ... ] ... [ matching queries ]

Slots beyond an image's own target count are padding (zero content, box 0.5): they are
neither positives nor matched, and count as background in the class loss.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.ops import box_convert


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit(x) with x clamped to [eps, 1 - eps] so that boxes on the border stay finite."""
    x = x.clamp(min=eps, max=1 - eps)
    return torch.log(x / (1 - x))


@dataclass(frozen=True)
class DenoisingMeta:
    """How the DN queries are laid out: ``num_groups`` groups of ``2 * max_targets`` queries."""

    num_groups: int
    max_targets: int

    @property
    def group_size(self) -> int:
        return 2 * self.max_targets

    @property
    def pad_size(self) -> int:
        """Number of DN queries in front of the matching queries."""
        return self.num_groups * self.group_size

    def positive_indices(self, num_targets: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(query index, target index) of an image's positive DN queries, group after group."""
        targets = torch.arange(num_targets, device=device)
        groups = torch.arange(self.num_groups, device=device)
        query_idx = (groups[:, None] * self.group_size + targets[None, :]).flatten()
        return query_idx, targets.repeat(self.num_groups)


def denoising_attention_mask(meta: DenoisingMeta, num_matching_queries: int, device=None) -> torch.Tensor:
    """(T, T) bool self-attention mask, True = may not attend, for T = DN + matching queries.

    A DN query sees its own group and the matching queries; a matching query sees only the
    matching queries (otherwise it could copy the noised ground truth).
    """
    total = meta.pad_size + num_matching_queries
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[meta.pad_size:, :meta.pad_size] = True
    group = torch.arange(meta.pad_size, device=device) // meta.group_size
    mask[:meta.pad_size, :meta.pad_size] = group[:, None] != group[None, :]
    return mask


class ContrastiveDenoising(nn.Module):
    """Builds the CDN queries of a batch from its targets.

    Group rule (DINO and the released mmdet config): ``num_dn_queries`` counts the positive
    queries, so ``num_groups = max(1, num_dn_queries // max_targets)`` and each group also has
    as many negatives; the DN part holds at most ``2 * num_dn_queries`` queries (200 by default),
    unless one image has more than ``num_dn_queries`` objects (then one group of 2 * max_targets).
    """

    def __init__(self, num_classes: int, embed_dim: int = 256, num_dn_queries: int = 100,
                 label_noise: float = 0.5, box_noise: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.num_dn_queries = num_dn_queries
        self.label_noise = label_noise
        self.box_noise = box_noise
        self.label_embedding = nn.Embedding(num_classes, embed_dim)

    def _noisy_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace a fraction ``label_noise / 2`` of the labels by random classes."""
        if self.label_noise <= 0:
            return labels
        flip = torch.rand(labels.shape, device=labels.device) < self.label_noise * 0.5
        random_labels = torch.randint_like(labels, 0, self.num_classes)
        return torch.where(flip, random_labels, labels)

    def _noisy_boxes(self, boxes: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Move each corner by a fraction of half the box size: in [0, 1) * box_noise for
        positives, [1, 2) * box_noise for negatives, random sign; clamp to the image."""
        if self.box_noise <= 0:
            return boxes
        corners = box_convert(boxes, "cxcywh", "xyxy")
        half_size = boxes[:, 2:].repeat(1, 2) * 0.5
        magnitude = torch.rand_like(corners) + negative[:, None].to(corners.dtype)
        sign = torch.randint_like(corners, 0, 2) * 2 - 1
        corners = (corners + sign * magnitude * half_size * self.box_noise).clamp(0.0, 1.0)
        return box_convert(corners, "xyxy", "cxcywh")

    def forward(self, targets: List[Dict[str, torch.Tensor]], num_matching_queries: int
                ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, DenoisingMeta]]:
        """
        Args:
            targets: per image ``labels`` (N,) and ``boxes`` (N, 4) normalised cxcywh.
            num_matching_queries: queries that follow the DN part (for the attention mask).
        Returns:
            None when no image has a target, else ``(content (B, D, C), reference (B, D, 4)
            inverse-sigmoid boxes, attn_mask (D + Q, D + Q) bool True = blocked, meta)``.
        """
        device = self.label_embedding.weight.device
        counts = [len(t["labels"]) for t in targets]
        max_targets = max(counts, default=0)
        if max_targets == 0:
            return None
        meta = DenoisingMeta(num_groups=max(1, self.num_dn_queries // max_targets), max_targets=max_targets)
        batch, groups = len(targets), meta.num_groups

        labels = torch.cat([t["labels"] for t in targets]).to(device)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
        # Filled on the device (no host-to-device copy, which syncs on CUDA).
        image_idx = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])
        target_idx = torch.cat([torch.arange(n, device=device) for n in counts])

        # Copies ordered (group, positive/negative, target): slot = g * 2M + {0, M} + j.
        num_total = labels.numel()
        copies = 2 * groups
        group_id = torch.arange(groups, device=device).repeat_interleave(2 * num_total)
        negative = torch.arange(2, device=device).repeat_interleave(num_total).repeat(groups).bool()
        slot = group_id * meta.group_size + negative.long() * max_targets + target_idx.repeat(copies)
        image = image_idx.repeat(copies)

        noisy_labels = self._noisy_labels(labels.repeat(copies))
        noisy_boxes = self._noisy_boxes(boxes.repeat(copies, 1), negative)

        embed_dim = self.label_embedding.embedding_dim
        content = self.label_embedding.weight.new_zeros(batch, meta.pad_size, embed_dim)
        content = content.index_put((image, slot), self.label_embedding(noisy_labels))
        reference = torch.zeros(batch, meta.pad_size, 4, device=device)
        reference[image, slot] = inverse_sigmoid(noisy_boxes)
        attn_mask = denoising_attention_mask(meta, num_matching_queries, device)
        return content, reference, attn_mask, meta
