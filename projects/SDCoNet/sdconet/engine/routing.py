"""Gradient routing between the SR and the detection task: how the SR gradient on the parameters
both tasks reach (the shared Swin encoder) joins the detection gradient there.

* ``sum``: plain sum (the release);
* ``project``: PCGrad-style, the SR gradient loses its component along the detection gradient
  when the two conflict (negative dot product), so the update never works against detection.
  ``per_tensor`` measures the conflict on each shared tensor, ``global`` on all of them as one
  vector. Not in the release;
* ``stop``: the SR gradient never reaches the shared parameters; only the SR decoder learns.

Plain functions on lists of gradients (one tensor per shared parameter, in the same order for both
tasks); the training step that produces and applies them is :mod:`.train_loop`.
"""
from typing import Dict, List, Optional

import torch

ROUTING_MODES = ("sum", "project", "stop")
PROJECTIONS = ("per_tensor", "global")


def check_routing(mode: str, projection: str = "per_tensor") -> None:
    """ValueError for a routing mode or projection granularity that does not exist."""
    if mode not in ROUTING_MODES:
        raise ValueError(f"gradient routing mode must be one of {ROUTING_MODES}, got {mode!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"granularity must be per_tensor or global, got {projection!r}")


def project_conflicting(sr_grads: List[torch.Tensor], det_grads: List[torch.Tensor],
                        granularity: str = "per_tensor") -> List[torch.Tensor]:
    """SR gradients with the component that opposes the detection gradient removed (PCGrad).

    For a pair with ``<g_sr, g_det> < 0``: ``g_sr - <g_sr, g_det> / |g_det|^2 * g_det``, which is
    orthogonal to ``g_det``; pairs that do not conflict are returned unchanged.
    """
    check_routing("project", granularity)
    if granularity == "global":
        dot = sum((s.double() * d.double()).sum() for s, d in zip(sr_grads, det_grads))
        norm = sum(d.double().pow(2).sum() for d in det_grads)
        if dot >= 0 or norm == 0:
            return list(sr_grads)
        coef = (dot / norm).to(sr_grads[0].dtype)
        return [s - coef * d for s, d in zip(sr_grads, det_grads)]
    out = []
    for s, d in zip(sr_grads, det_grads):
        dot, norm = (s * d).sum(), d.pow(2).sum()
        coef = torch.where((dot < 0) & (norm > 0), dot / norm.clamp(min=torch.finfo(d.dtype).tiny), 0.0)
        out.append(s - coef * d)
    return out


def routed_sr_gradients(mode: str, sr_grads: List[torch.Tensor], det_grads: List[torch.Tensor],
                        projection: str = "per_tensor") -> Optional[List[torch.Tensor]]:
    """What the SR task adds to the shared parameters' detection gradients under ``mode``: its
    gradients (``sum``), their projections (``project``) or nothing (``stop``: None)."""
    check_routing(mode, projection)
    if mode == "stop":
        return None
    if mode == "project":
        return project_conflicting(sr_grads, det_grads, projection)
    return list(sr_grads)


def routing_statistics(sr_grads: List[torch.Tensor], det_grads: List[torch.Tensor]) -> Dict[str, float]:
    """Cosine similarity of the two gradients over all shared parameters, and the fraction of
    shared tensors on which they conflict (negative dot product)."""
    dots = torch.stack([(s.double() * d.double()).sum() for s, d in zip(sr_grads, det_grads)])
    sr_norm = torch.sqrt(sum(s.double().pow(2).sum() for s in sr_grads))
    det_norm = torch.sqrt(sum(d.double().pow(2).sum() for d in det_grads))
    cosine = dots.sum() / (sr_norm * det_norm).clamp(min=1e-30)
    return {"cosine": float(cosine), "conflict_fraction": float((dots < 0).double().mean())}
