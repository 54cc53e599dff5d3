"""One-to-one assignment of predictions to ground-truth boxes (DETR / DINO Hungarian matching)."""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """(Q, T) cost of giving each target's class to each prediction: the focal loss of calling it
    positive minus the focal loss of calling it negative (so only the sign flip is priced)."""
    prob = logits.sigmoid()
    # -log(p) = softplus(-x), -log(1 - p) = softplus(x): stable for large logits.
    positive = alpha * (1 - prob) ** gamma * F.softplus(-logits)
    negative = (1 - alpha) * prob**gamma * F.softplus(logits)
    return (positive - negative)[:, labels]


class HungarianMatcher(nn.Module):
    """Matches each image's predictions to its targets with minimal
    ``cost_class * focal + cost_bbox * L1(cxcywh) - cost_giou * GIoU``."""

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                    target_boxes: torch.Tensor) -> torch.Tensor:
        """(Q, T) matching cost of one image (fp32; boxes are sigmoid cxcywh)."""
        logits, boxes, target_boxes = logits.float(), boxes.float(), target_boxes.float()
        class_cost = focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        l1_cost = torch.cdist(boxes, target_boxes, p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
        return self.cost_class * class_cost + self.cost_bbox * l1_cost - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor,
                targets: List[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            pred_logits: (B, Q, C); pred_boxes: (B, Q, 4) normalised cxcywh.
            targets: per image ``labels`` (N,) and ``boxes`` (N, 4) normalised cxcywh.
        Returns:
            per image (pred_idx, tgt_idx), int64 on the predictions' device, sorted by pred_idx.
        """
        return self.match_sets([(pred_logits, pred_boxes)], targets)[0]

    @torch.no_grad()
    def match_sets(self, predictions: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                   targets: List[Dict[str, torch.Tensor]]) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`forward` for several prediction sets (the decoder layers, the encoder) at once.

        scipy matches on the host, so the cost matrices of all sets and images travel there in one
        transfer and the assignments come back in one: on CUDA one device sync per training step
        instead of one per set and image.
        """
        if not targets:
            return [[] for _ in predictions]
        device = predictions[0][0].device
        # One small matrix per image: a batch-wide (B*Q, sum N) matrix wastes memory and time.
        costs = [self.cost_matrix(logits[i], boxes[i], target["labels"], target["boxes"]).flatten()
                 for logits, boxes in predictions for i, target in enumerate(targets) if len(target["labels"])]
        # A diverged model gives NaN/inf costs, which scipy refuses; match anyway so the
        # non-finite loss reaches the trainer, which stops naming the iteration and the loss.
        host_costs = torch.nan_to_num(torch.cat(costs), nan=1e8, posinf=1e8, neginf=-1e8).cpu().numpy() if costs else None
        pairs, offset = [], 0
        for logits, _ in predictions:
            for target in targets:
                num_targets, num_queries = len(target["labels"]), logits.shape[1]
                if num_targets == 0:
                    pairs.append(np.zeros((2, 0), dtype=np.int64))
                    continue
                cost = host_costs[offset:offset + num_queries * num_targets].reshape(num_queries, num_targets)
                offset += num_queries * num_targets
                pairs.append(np.stack(linear_sum_assignment(cost)).astype(np.int64))
        on_device = torch.as_tensor(np.concatenate(pairs, axis=1)).to(device).split([p.shape[1] for p in pairs], dim=1)
        per_image = [(pair[0], pair[1]) for pair in on_device]
        return [per_image[k * len(targets):(k + 1) * len(targets)] for k in range(len(predictions))]
