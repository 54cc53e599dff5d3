"""DINO set losses: sigmoid focal classification, L1 and GIoU box losses (docs/method.md, Losses and weights).

Applied to the last decoder layer, every auxiliary layer, the selected encoder proposals
(each matched on its own with the Hungarian matcher) and the denoising queries (matched to
their ground truth by construction).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from .transformer.denoising import DenoisingMeta

Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def average_num_boxes(targets: Sequence[Dict[str, torch.Tensor]], device) -> torch.Tensor:
    """Ground-truth boxes per rank, averaged over ranks and clamped to >= 1: the loss normaliser."""
    # Filled on the device: a tensor built from host data would be a (synchronising) copy on CUDA.
    num = torch.full((), float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return num.clamp(min=1.0)


def paired_giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Sum of ``1 - GIoU`` over paired xyxy boxes (row i with row i), as torchvision's
    ``generalized_box_iou_loss(..., reduction="sum")``.

    Why not torchvision's: it finds the overlapping pairs with a boolean mask, and indexing with a
    mask makes the host wait for the device (5 syncs per call, 65 per CUDA training step). Clamping
    the overlap at zero gives the same values with no sync.
    """
    x1, y1, x2, y2 = boxes1.unbind(-1)
    u1, v1, u2, v2 = boxes2.unbind(-1)
    overlap = (torch.min(x2, u2) - torch.max(x1, u1)).clamp(min=0) * (torch.min(y2, v2) - torch.max(y1, v1)).clamp(min=0)
    union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - overlap
    eps = 1e-7
    iou = overlap / (union + eps)
    hull = (torch.max(x2, u2) - torch.min(x1, u1)) * (torch.max(y2, v2) - torch.min(y1, v1))
    giou = iou - (hull - union) / (hull + eps)
    return (1 - giou).sum()


class DINOCriterion(nn.Module):
    """Returns the weighted losses ``loss_{class,bbox,giou}`` with suffixes ``""`` (last layer),
    ``_{i}`` (decoder layer i), ``_enc``, ``_dn`` and ``_dn_{i}``.

    The key set depends only on the number of decoder layers: the DN keys are zero (with a graph)
    when a batch has no denoising queries, so logging and DDP see the same keys every iteration.
    """

    DEFAULT_WEIGHTS = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: Optional[Dict[str, float]] = None,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        """weight_dict: weights of ``loss_class``, ``loss_bbox``, ``loss_giou`` (all suffixes alike);
        missing keys take the DINO defaults 1 / 5 / 2."""
        super().__init__()
        unknown = set(weight_dict or {}) - set(self.DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; expected {sorted(self.DEFAULT_WEIGHTS)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {**self.DEFAULT_WEIGHTS, **(weight_dict or {})}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def set_losses(self, outputs: Dict[str, torch.Tensor], targets, indices: Indices,
                   normalizer: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Unweighted losses of one set of predictions given (pred_idx, tgt_idx) per image."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"criterion built for {self.num_classes} classes, logits have {logits.shape[-1]}")
        device = logits.device
        batch_idx = torch.cat([torch.full_like(pred, i) for i, (pred, _) in enumerate(indices)])
        pred_idx = torch.cat([pred for pred, _ in indices])
        labels = torch.cat([t["labels"].to(device)[tgt] for t, (_, tgt) in zip(targets, indices)])
        target_boxes = torch.cat([t["boxes"].to(device)[tgt] for t, (_, tgt) in zip(targets, indices)]).float()

        # No background class: unmatched queries have an all-zero target (the extra class, cut off).
        # Built by indexing with tensors only: a Python scalar written through an index is a
        # host-to-device copy, a sync on CUDA.
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=device)
        target_classes[batch_idx, pred_idx] = labels
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].float()
        loss_class = sigmoid_focal_loss(logits.float(), onehot, self.focal_alpha, self.focal_gamma, reduction="sum")

        matched = boxes[batch_idx, pred_idx].float()
        loss_bbox = F.l1_loss(matched, target_boxes, reduction="sum")
        loss_giou = paired_giou_loss(box_convert(matched, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
        return {"loss_class": loss_class / normalizer, "loss_bbox": loss_bbox / normalizer,
                "loss_giou": loss_giou / normalizer}

    def _add(self, losses: Dict[str, torch.Tensor], unweighted: Dict[str, torch.Tensor], suffix: str):
        for name, value in unweighted.items():
            losses[name + suffix] = value * self.weights[name]

    def forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """outputs as returned by ``DINOTransformer``; targets: per image ``labels`` and normalised cxcywh ``boxes``."""
        normalizer = average_num_boxes(targets, outputs["pred_logits"].device)
        losses: Dict[str, torch.Tensor] = {}
        aux_outputs = outputs.get("aux_outputs") or []

        sets = [(outputs, "")] + [(aux, f"_{i}") for i, aux in enumerate(aux_outputs)]
        if outputs.get("enc_outputs") is not None:
            sets.append((outputs["enc_outputs"], "_enc"))
        # All sets are matched in one call: one host round trip for the Hungarian matching.
        all_indices = self.matcher.match_sets([(p["pred_logits"], p["pred_boxes"]) for p, _ in sets], targets)
        for (prediction, suffix), indices in zip(sets, all_indices):
            self._add(losses, self.set_losses(prediction, targets, indices, normalizer), suffix)

        dn_suffixes = [f"_dn_{i}" for i in range(len(aux_outputs))] + ["_dn"]
        dn_outputs, dn_meta = outputs.get("dn_outputs"), outputs.get("dn_meta")
        if dn_outputs is not None and dn_meta is not None:
            if len(dn_outputs) != len(dn_suffixes):
                raise ValueError(f"{len(dn_outputs)} DN outputs for {len(dn_suffixes)} decoder layers")
            indices = self.denoising_indices(dn_meta, targets, outputs["pred_logits"].device)
            for prediction, suffix in zip(dn_outputs, dn_suffixes):
                # Every group holds one positive per object: normalise per object and group.
                self._add(losses, self.set_losses(prediction, targets, indices, normalizer * dn_meta.num_groups), suffix)
        else:
            zero = outputs["pred_logits"].sum() * 0.0
            for suffix in dn_suffixes:
                for name in self.weights:
                    losses[name + suffix] = zero
        return losses

    @staticmethod
    def denoising_indices(meta: DenoisingMeta, targets, device) -> Indices:
        """Positive DN queries are matched to the object they were made from; the rest are background."""
        return [meta.positive_indices(len(t["labels"]), device) for t in targets]
