"""Necks from the backbone's res3..res5 to the transformer's levels (all ``out_channels`` wide).

- :class:`ChannelMapper`: the authors' neck: a 1x1 conv (no bias) + GroupNorm(32) per
  input, no activation, no fusion between levels.
- :class:`FPN`: 1x1 laterals, top-down nearest upsampling and addition, 3x3 output convs.

Both add ``num_extra_levels`` stride-2 3x3 convs (+ norm): the first on the last backbone feature,
the next ones on the previous extra level. With res3..res5 and one extra level the outputs have
strides 8, 16, 32, 64 of the (LR) input. detectron2's own FPN class wraps a bottom-up backbone
and returns a dict; here the neck sits between a backbone and a transformer that both work on
lists, so it is a small module built from detectron2's ``Conv2d`` / ``get_norm``.
"""
from typing import Dict, List, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm

__all__ = ["ChannelMapper", "FPN", "build_neck"]


def _conv(in_channels: int, out_channels: int, kernel_size: int, norm: str, stride: int = 1) -> Conv2d:
    """Conv (+ norm, no activation); the bias is dropped when a norm follows. Xavier init."""
    conv = Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                  bias=not norm, norm=get_norm(norm, out_channels))
    nn.init.xavier_uniform_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class _Neck(nn.Module):
    """Shared part: input checks, the extra stride-2 levels and ``output_shapes``."""

    def __init__(self, input_shapes: Sequence[ShapeSpec], out_channels: int, num_extra_levels: int, norm: str):
        super().__init__()
        if not input_shapes:
            raise ValueError("A neck needs at least one input feature")
        strides = [s.stride for s in input_shapes]
        if strides != sorted(strides):
            raise ValueError(f"Neck inputs must go from fine to coarse, got strides {strides}")
        self.in_channels = [s.channels for s in input_shapes]
        self.extra_convs = nn.ModuleList(
            _conv(self.in_channels[-1] if i == 0 else out_channels, out_channels, 3, norm, stride=2)
            for i in range(num_extra_levels))
        self.output_shapes = [ShapeSpec(channels=out_channels, stride=s) for s in strides] + [
            ShapeSpec(channels=out_channels, stride=strides[-1] * 2 ** (i + 1)) for i in range(num_extra_levels)]

    def _check(self, features: Sequence[torch.Tensor]) -> None:
        if [f.shape[1] for f in features] != self.in_channels:
            raise ValueError(f"Expected inputs with channels {self.in_channels}, "
                             f"got {[f.shape[1] for f in features]}")

    def _add_extra_levels(self, outputs: List[torch.Tensor], last_input: torch.Tensor) -> List[torch.Tensor]:
        for i, conv in enumerate(self.extra_convs):
            outputs.append(conv(last_input if i == 0 else outputs[-1]))
        return outputs


class ChannelMapper(_Neck):
    """Project every input to ``out_channels`` on its own, then add the extra levels."""

    def __init__(self, input_shapes: Sequence[ShapeSpec], out_channels: int = 256,
                 num_extra_levels: int = 1, norm: str = "GN"):
        super().__init__(input_shapes, out_channels, num_extra_levels, norm)
        self.convs = nn.ModuleList(_conv(c, out_channels, 1, norm) for c in self.in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        self._check(features)
        outputs = [conv(x) for conv, x in zip(self.convs, features)]
        return self._add_extra_levels(outputs, features[-1])


class FPN(_Neck):
    """Feature pyramid: coarse levels are upsampled (nearest) and added to the finer laterals."""

    def __init__(self, input_shapes: Sequence[ShapeSpec], out_channels: int = 256,
                 num_extra_levels: int = 1, norm: str = "GN"):
        super().__init__(input_shapes, out_channels, num_extra_levels, norm)
        self.lateral_convs = nn.ModuleList(_conv(c, out_channels, 1, norm) for c in self.in_channels)
        self.output_convs = nn.ModuleList(_conv(out_channels, out_channels, 3, norm) for _ in self.in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        self._check(features)
        top_down = self.lateral_convs[-1](features[-1])
        outputs = [self.output_convs[-1](top_down)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            # size= rather than scale_factor=2: odd maps (inputs not divisible by 32) still line up
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output_convs[i](top_down))
        return self._add_extra_levels(outputs, features[-1])


NECKS = {"FPN": FPN, "ChannelMapper": ChannelMapper}


def build_neck(cfg, input_shapes: Union[Sequence[ShapeSpec], Dict[str, ShapeSpec]]) -> _Neck:
    """Neck named by ``MODEL.SDCONET.NECK.NAME`` for the backbone features ``input_shapes``.

    ``input_shapes`` is the list of ShapeSpecs of ``MODEL.SDCONET.SWIN.OUT_FEATURES`` (in that
    order), or the backbone's whole ``output_shape()`` dict, from which those are picked.
    """
    neck = cfg.MODEL.SDCONET.NECK
    if neck.NAME not in NECKS:
        raise ValueError(f"Invalid config: MODEL.SDCONET.NECK.NAME={neck.NAME!r}: must be one of {sorted(NECKS)}")
    if isinstance(input_shapes, dict):
        input_shapes = [input_shapes[f] for f in cfg.MODEL.SDCONET.SWIN.OUT_FEATURES]
    return NECKS[neck.NAME](input_shapes, out_channels=neck.OUT_CHANNELS,
                            num_extra_levels=neck.NUM_EXTRA_LEVELS, norm="GN")
