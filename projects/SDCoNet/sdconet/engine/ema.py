"""Exponential moving average of the weights, saved in checkpoints and used for evaluation."""
import contextlib
from typing import Dict

import torch
from torch import nn


class ModelEMA:
    """``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step.

    Floating-point tensors of the state dict are averaged in fp32; integer buffers are copied.
    A checkpointable (``state_dict`` / ``load_state_dict``), so detectron2's checkpointer saves it
    next to the model and ``--resume`` restores it.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: Dict[str, torch.Tensor] = {
            k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if value.is_floating_point():
                shadow.lerp_(value.detach().float(), 1.0 - self.decay)
            else:
                shadow.copy_(value)

    def state_dict(self) -> Dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: Dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}... (was it saved from another model?)")
        self.decay = state["decay"]
        for name, value in state["shadow"].items():
            if name in self.shadow:
                self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """Temporarily load the averaged weights into ``model`` (for evaluation)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(backup[k].dtype) for k, v in self.shadow.items()})
        try:
            yield model
        finally:
            model.load_state_dict(backup)
