"""One-to-one assignment of predictions to ground-truth boxes (DETR / DINO Hungarian matching)."""
from typing import Dict, List, Tuple

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
        device = pred_logits.device
        indices = []
        # One small matrix per image: a batch-wide (B*Q, sum N) matrix wastes memory and time.
        for logits, boxes, target in zip(pred_logits, pred_boxes, targets):
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64, device=device)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits, boxes, target["labels"], target["boxes"]).cpu()
            # A diverged model gives NaN/inf costs, which scipy refuses; match anyway so the
            # non-finite loss reaches the trainer, which stops naming the iteration and the loss.
            cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)
            pred_idx, tgt_idx = linear_sum_assignment(cost.numpy())
            pair = torch.as_tensor(np.stack([pred_idx, tgt_idx]), dtype=torch.int64).to(device)
            indices.append((pair[0], pair[1]))
        return indices
