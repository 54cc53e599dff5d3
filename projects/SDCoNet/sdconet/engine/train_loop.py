"""SDCoNet's training step: detectron2's ``SimpleTrainer`` with the SR and detection losses kept apart.

``GradientRoutingTrainer.run_step``, in order:

1. fetches the batch and reseeds torch, numpy and random from (SEED, iteration, rank), so a
   resumed run draws the same randomness as an uninterrupted one;
2. runs the forward under ``torch.autocast`` (bf16 on CPU, bf16/fp16 on CUDA, a GradScaler for
   fp16 only). In phase 1 of gradient routing (iteration < ``routing_start``) the SR decoder is
   frozen and the forward runs inside ``model.outputs(sr=False)``: no SR branch, no ``loss_sr``;
3. stops on a non-finite loss before any update, naming it;
4. backward: one pass for all losses when nothing keeps the tasks apart; otherwise the detection
   backward, then the SR gradients by ``autograd.grad``, joined on the shared parameters as
   :mod:`.routing` says (``project``, ``stop``, or the statistics logged every ``log_period``);
5. under DDP both passes run in ``no_sync`` and the gradients are averaged over ranks by hand
   before they are joined, so the result equals one process with the whole batch, and parameters
   a phase leaves unused (the SR decoder in phase 1) do not stall DDP's reducer;
6. the optimizer step, then the EMA update.
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
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from ..modeling.meta_arch import SR_LOSS_KEYS
from .launch import unwrap
from .routing import check_routing, routed_sr_gradients, routing_statistics


def mean_over_ranks(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """Element-wise mean of each tensor over all ranks, in one all-reduce of a flat buffer;
    the tensors themselves when not distributed."""
    if comm.get_world_size() == 1 or not tensors:
        return list(tensors)
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat /= comm.get_world_size()
    return list(_unflatten_dense_tensors(flat, tensors))


def average_gradients_across_ranks(params: Iterable[torch.Tensor]) -> None:
    """All-reduce (mean) the ``.grad`` of ``params``; a missing gradient counts as zeros, so ranks
    whose batch did not reach a parameter still agree."""
    if comm.get_world_size() == 1:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, g in zip(params, mean_over_ranks(grads)):
        p.grad = g


def accumulate(params, grads) -> None:
    """``p.grad += g`` for ``autograd.grad`` results (None: the parameter was not reached). A new
    ``.grad`` is a copy: ``autograd.grad`` may hand one tensor to several parameters. Its layout
    is the optimizer's to fix (``trainer.with_gradients_laid_out_like_parameters``)."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.add_(g)


class OpenedAtFirstStep:
    """The training data as ``SimpleTrainer`` holds it: ``iter()`` opens nothing, :meth:`open`
    does (also the first ``next``).

    detectron2 0.6's ``SimpleTrainer.__init__`` opens the loader at once (later releases defer
    it), which would start its workers before ``resume_or_load`` has told the sampler where the
    data stream continues.
    """

    def __init__(self, loader):
        self.loader = loader
        self._iterator = None

    def __iter__(self):
        return self

    def open(self) -> None:
        if self._iterator is None:
            self._iterator = iter(self.loader)

    def __next__(self):
        self.open()
        return next(self._iterator)


class GradientRoutingTrainer(SimpleTrainer):
    """detectron2 ``SimpleTrainer`` with gradient routing, autocast, loss checks, seeding and EMA.

    Args:
        routing_start: first iteration of phase 2 (SR decoder trained).
        mode, projection: see :mod:`.routing`.
        log_period: every this many iterations the two gradients are measured (and logged as
            ``routing/cosine`` and ``routing/conflict_fraction``); 0: never.
        amp, amp_dtype: autocast the forward (fp16 needs CUDA).
        seed: reseed every step from (seed, iteration); negative: no reseeding.
        ema: a :class:`.ema.ModelEMA` to update after every step.
    """

    def __init__(self, model, data_loader, optimizer, *, routing_start: int = 0, mode: str = "sum",
                 projection: str = "per_tensor", log_period: int = 20, amp: bool = False,
                 amp_dtype: torch.dtype = torch.bfloat16, seed: int = -1, ema=None):
        check_routing(mode, projection)
        super().__init__(model, OpenedAtFirstStep(data_loader), optimizer)
        self.routing_start, self.mode, self.projection, self.log_period = routing_start, mode, projection, log_period
        self.seed, self.ema = seed, ema
        self.amp, self.amp_dtype = amp, amp_dtype
        self.device_type = next(unwrap(model).parameters()).device.type
        if amp and amp_dtype == torch.float16 and self.device_type != "cuda":
            raise ValueError("AMP with float16 needs CUDA (a GradScaler); use bfloat16 on CPU")
        self.scaler = torch.amp.GradScaler(self.device_type) if amp and amp_dtype == torch.float16 else None
        self.phase = None

    # ------------------------------------------------------------------ phase
    def _switches_sr(self) -> bool:
        """Whether the model has an SR decoder for the phases to freeze and skip."""
        model = unwrap(self.model)
        return getattr(model, "sr_decoder", None) is not None and hasattr(model, "outputs")

    def set_phase(self, phase: int) -> None:
        """Phase 1: SR decoder frozen (and skipped, see :meth:`_outputs`); phase 2: SR decoder trained."""
        if phase == self.phase:
            return
        if self._switches_sr():
            unwrap(self.model).sr_decoder.requires_grad_(phase == 2)
        self.phase = phase

    def phase_at(self, iteration: int) -> int:
        return 1 if iteration < self.routing_start else 2

    def _outputs(self):
        """The model's outputs for this phase: without the SR branch in phase 1."""
        if not self._switches_sr():
            return contextlib.nullcontext()
        return unwrap(self.model).outputs(sr=self.phase == 2)

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
        self._data_loader_iter.open()  # draws from torch's RNG: before the seeding, not after it
        self._seed_iteration(stage=0)  # augmentation draws
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        # Again for the model, so that its draws (DN noise, drop path) do not depend on what the
        # fetch consumed (the mapper's draws in this process; none with loader workers).
        self._seed_iteration(stage=1)

        distributed = isinstance(self.model, DistributedDataParallel)
        with (self.model.no_sync() if distributed else contextlib.nullcontext()):
            with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp), self._outputs():
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
        """Both tasks' gradients on the parameters, averaged over ranks; the routing statistics
        when they were measured."""
        params = [p for p in unwrap(self.model).parameters() if p.requires_grad]
        measure = self.log_period > 0 and self.iter % self.log_period == 0
        if sr_loss is None or (self.mode == "sum" and not measure):
            self._scaled(det_loss if sr_loss is None else det_loss + sr_loss).backward()
            if distributed:
                average_gradients_across_ranks(params)
            return None

        sr_params = [p for p in unwrap(self.model).sr_decoder.parameters() if p.requires_grad]
        sr_ids = {id(p) for p in sr_params}
        others = [p for p in params if id(p) not in sr_ids]
        self._scaled(det_loss).backward(retain_graph=True)
        if self.mode == "stop" and not measure:
            # Only the SR decoder's gradient is wanted: autograd prunes the rest of the graph.
            accumulate(sr_params, torch.autograd.grad(self._scaled(sr_loss), sr_params, allow_unused=True))
            if distributed:
                average_gradients_across_ranks(params)
            return None

        grads = torch.autograd.grad(self._scaled(sr_loss), sr_params + others, allow_unused=True)
        accumulate(sr_params, grads[: len(sr_params)])
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
        routed = routed_sr_gradients(self.mode, sr_shared, det_shared, self.projection)
        if routed is not None:
            accumulate(shared_params, routed)
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
