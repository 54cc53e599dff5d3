"""Gradient routing between the SR and the detection task (spec §5), inside detectron2's loop.

``GradientRoutingTrainer`` is a ``SimpleTrainer`` whose ``run_step`` separates the two tasks:

* phase 1 (iteration < ``START_ITER``): the SR decoder is frozen and not run at all; only the
  detection (+ saliency) losses train the model;
* phase 2: the SR loss is back. The detection backward runs first, then the SR backward, and
  their gradients meet on the parameters both tasks reach (the shared Swin encoder):

  - ``sum``: plain sum (the release; one backward when nothing is logged);
  - ``project``: PCGrad-style, the SR gradient loses its component along the detection gradient
    when the two conflict (negative dot product), so the update never works against detection.
    ``per_tensor`` measures the conflict on each shared tensor, ``global`` on all of them as one
    vector. Not in the release;
  - ``stop``: the SR gradient never reaches the shared parameters; only the SR decoder learns.

It also runs the forward under ``torch.autocast`` (bf16 on CPU, bf16/fp16 on CUDA, a GradScaler
for fp16 only), stops on a non-finite loss naming it, and reseeds the RNGs from (SEED, iteration)
so a resumed run draws the same randomness as an uninterrupted one.

Under DDP both backward passes run in ``no_sync`` and the gradients are averaged over ranks by
hand before they are combined, so the result equals one process with the whole batch and
parameters unused in a phase (the SR decoder in phase 1) do not stall the reducer.
"""
import contextlib
import math
import random
import time
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from ..modeling.meta_arch import SR_LOSS_KEYS

ROUTING_MODES = ("sum", "project", "stop")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def project_conflicting(sr_grads: List[torch.Tensor], det_grads: List[torch.Tensor],
                        granularity: str = "per_tensor") -> List[torch.Tensor]:
    """SR gradients with the component that opposes the detection gradient removed (PCGrad).

    For a pair with ``<g_sr, g_det> < 0``: ``g_sr - <g_sr, g_det> / |g_det|^2 * g_det``, which is
    orthogonal to ``g_det``; pairs that do not conflict are returned unchanged.
    """
    if granularity == "global":
        dot = sum((s.double() * d.double()).sum() for s, d in zip(sr_grads, det_grads))
        norm = sum(d.double().pow(2).sum() for d in det_grads)
        if dot >= 0 or norm == 0:
            return list(sr_grads)
        coef = (dot / norm).to(sr_grads[0].dtype)
        return [s - coef * d for s, d in zip(sr_grads, det_grads)]
    if granularity != "per_tensor":
        raise ValueError(f"granularity must be per_tensor or global, got {granularity!r}")
    out = []
    for s, d in zip(sr_grads, det_grads):
        dot, norm = (s * d).sum(), d.pow(2).sum()
        coef = torch.where((dot < 0) & (norm > 0), dot / norm.clamp(min=torch.finfo(d.dtype).tiny), 0.0)
        out.append(s - coef * d)
    return out


def routing_statistics(sr_grads: List[torch.Tensor], det_grads: List[torch.Tensor]) -> Dict[str, float]:
    """Cosine similarity of the two gradients over all shared parameters, and the fraction of
    shared tensors on which they conflict (negative dot product)."""
    dots = torch.stack([(s.double() * d.double()).sum() for s, d in zip(sr_grads, det_grads)])
    sr_norm = torch.sqrt(sum(s.double().pow(2).sum() for s in sr_grads))
    det_norm = torch.sqrt(sum(d.double().pow(2).sum() for d in det_grads))
    cosine = dots.sum() / (sr_norm * det_norm).clamp(min=1e-30)
    return {"cosine": float(cosine), "conflict_fraction": float((dots < 0).double().mean())}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_ranks(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """Element-wise mean of each tensor over all ranks, in one all-reduce of a flat buffer;
    the tensors themselves when not distributed."""
    if not _distributed() or not tensors:
        return list(tensors)
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return list(_unflatten_dense_tensors(flat, tensors))


def average_gradients_across_ranks(params: Iterable[torch.Tensor]) -> None:
    """All-reduce (mean) the ``.grad`` of ``params``; a missing gradient counts as zeros, so ranks
    whose batch did not reach a parameter still agree."""
    if not _distributed():
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, mean_over_ranks(grads)):
        p.grad = g


class GradientRoutingTrainer(SimpleTrainer):
    """detectron2 ``SimpleTrainer`` with gradient routing, autocast, loss checks and seeding."""

    def __init__(self, model, data_loader, optimizer, *, start_iter: int = 0, mode: str = "sum",
                 projection: str = "per_tensor", log_period: int = 20, amp: bool = False,
                 amp_dtype: torch.dtype = torch.bfloat16, seed: int = -1, ema=None):
        # SimpleTrainer would open the data iterator here; we open it at the first step, once a
        # resume has told the sampler where to continue.
        TrainerBase.__init__(self)
        model.train()
        self.model, self.data_loader, self.optimizer = model, data_loader, optimizer
        self._data_loader_iter = None
        if mode not in ROUTING_MODES:
            raise ValueError(f"SOLVER.GRADIENT_ROUTING.MODE must be one of {ROUTING_MODES}, got {mode!r}")
        self.routing_start = start_iter
        self.mode = mode
        self.projection = projection
        self.log_period = log_period
        self.seed = seed
        self.ema = ema
        self.amp = amp
        self.amp_dtype = amp_dtype
        device_type = next(unwrap(model).parameters()).device.type
        if amp and amp_dtype == torch.float16 and device_type != "cuda":
            raise ValueError("SOLVER.AMP.DTYPE=float16 needs CUDA; use bfloat16 on CPU")
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type) if amp and amp_dtype == torch.float16 else None
        self.phase = None

    # ------------------------------------------------------------------ phase
    def set_phase(self, phase: int) -> None:
        """Phase 1: SR decoder frozen and skipped; phase 2: SR decoder trained."""
        if phase == self.phase:
            return
        model = unwrap(self.model)
        sr_decoder = getattr(model, "sr_decoder", None)
        if sr_decoder is not None and hasattr(model, "sr_active"):
            model.sr_active = phase == 2
            sr_decoder.requires_grad_(phase == 2)
        self.phase = phase

    def phase_at(self, iteration: int) -> int:
        return 1 if iteration < self.routing_start else 2

    # ------------------------------------------------------------------ step
    def _seed_iteration(self, stage: int) -> None:
        """Seed torch, numpy and random from (SEED, iteration, stage, rank): randomness that depends
        only on the iteration is what makes a resumed run repeat an uninterrupted one; the rank gives
        every process its own draws (flips, DN noise, drop path), as one process with the whole batch."""
        if self.seed < 0:
            return
        seed = (self.seed * 1_000_003 + self.iter * 2 + stage) % (2**31)
        rank = comm.get_rank()
        if rank:  # rank 0 keeps the one-process seeds
            seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]) % (2**31)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def run_step(self):
        assert self.model.training, "[GradientRoutingTrainer] model was changed to eval mode!"
        self.set_phase(self.phase_at(self.iter))
        start = time.perf_counter()
        if self._data_loader_iter is None:
            self._data_loader_iter = iter(self.data_loader)
        self._seed_iteration(stage=0)  # augmentation draws
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        # Again for the model: the first fetch after a (re)start opens the loader, which draws
        # from torch's RNG, so the forward must not depend on what the fetch consumed.
        self._seed_iteration(stage=1)

        distributed = isinstance(self.model, DistributedDataParallel)
        with (self.model.no_sync() if distributed else contextlib.nullcontext()):
            with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp):
                loss_dict = self.model(data)
            self._check_finite(loss_dict)
            sr_terms = [v for k, v in loss_dict.items() if k in SR_LOSS_KEYS]
            sr_loss = sum(sr_terms) if sr_terms else None
            det_loss = sum(v for k, v in loss_dict.items() if k not in SR_LOSS_KEYS)
            self.optimizer.zero_grad(set_to_none=True)
            stats = self._backward(det_loss, sr_loss, distributed)

        self._write_metrics(loss_dict, data_time)
        storage = get_event_storage()
        storage.put_scalar("routing/phase", float(self.phase), smoothing_hint=False)
        if stats:
            storage.put_scalar("routing/cosine", stats["cosine"], smoothing_hint=False)
            storage.put_scalar("routing/conflict_fraction", stats["conflict_fraction"], smoothing_hint=False)

        if self.scaler is not None:
            # Unscale first: the optimizer clips before it steps, and a fused kernel would
            # otherwise receive the scale and clip scaled gradients.
            self.scaler.unscale_(self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(unwrap(self.model))

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _check_finite(self, loss_dict: Dict[str, torch.Tensor]) -> None:
        """Stop before any update when a loss is NaN/inf, naming it (one host sync)."""
        values = torch.stack([v.detach().float() for v in loss_dict.values()])
        finite = torch.isfinite(values).all().float()
        if isinstance(self.model, DistributedDataParallel):
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank stops, none waits in a collective
        if bool(finite):
            return
        bad = {k: float(v.detach()) for k, v in loss_dict.items() if not math.isfinite(float(v.detach()))} or "on another rank"
        raise FloatingPointError(
            f"Non-finite loss at iteration {self.iter}: {bad}. No update was made from it; the last "
            "checkpoint in OUTPUT_DIR is intact (resume with --resume, perhaps with a lower SOLVER.BASE_LR)")

    def _backward(self, det_loss, sr_loss, distributed: bool) -> Optional[Dict[str, float]]:
        params = [p for p in unwrap(self.model).parameters() if p.requires_grad]
        log_now = self.log_period > 0 and self.iter % self.log_period == 0
        if sr_loss is None or (self.mode == "sum" and not log_now):
            self._scaled(det_loss if sr_loss is None else det_loss + sr_loss).backward()
            if distributed:
                average_gradients_across_ranks(params)
            return None

        sr_params = [p for p in unwrap(self.model).sr_decoder.parameters() if p.requires_grad]
        sr_ids = {id(p) for p in sr_params}
        others = [p for p in params if id(p) not in sr_ids]
        self._scaled(det_loss).backward(retain_graph=True)
        if self.mode == "stop" and not log_now:
            # Only the SR decoder's gradient is wanted: autograd prunes the rest of the graph.
            sr_grads = torch.autograd.grad(self._scaled(sr_loss), sr_params, allow_unused=True)
            _accumulate(sr_params, sr_grads)
            if distributed:
                average_gradients_across_ranks(params)
            return None

        grads = torch.autograd.grad(self._scaled(sr_loss), sr_params + others, allow_unused=True)
        _accumulate(sr_params, grads[: len(sr_params)])
        shared = [(p, g) for p, g in zip(others, grads[len(sr_params):]) if g is not None]
        if distributed:
            average_gradients_across_ranks(params)
            shared = list(zip([p for p, _ in shared], mean_over_ranks([g for _, g in shared])))
        if not shared:
            return None
        shared_params = [p for p, _ in shared]
        sr_shared = [g for _, g in shared]
        det_shared = [p.grad if p.grad is not None else torch.zeros_like(p) for p in shared_params]
        stats = routing_statistics(sr_shared, det_shared)
        if self.mode == "project":
            sr_shared = project_conflicting(sr_shared, det_shared, self.projection)
        if self.mode != "stop":
            _accumulate(shared_params, sr_shared)
        return stats

    # ------------------------------------------------------------------ state
    def state_dict(self):
        ret = super().state_dict()
        if self.scaler is not None:
            ret["grad_scaler"] = self.scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.scaler is not None and "grad_scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["grad_scaler"])


def _accumulate(params, grads) -> None:
    """``p.grad += g``, keeping the parameter's memory layout as autograd's own accumulation does
    (``autograd.grad`` results may be laid out otherwise, e.g. for transposed convolutions)."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = torch.empty_like(p).copy_(g)
        else:
            p.grad.add_(g)
