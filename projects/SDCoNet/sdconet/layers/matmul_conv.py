"""Convolutions whose weights dwarf their inputs, computed as one matrix product.

The SR decoder's bottleneck (3x3, stride 2, 768 -> 1536 channels on an 8x8 map) and its first
expand (2x2 transposed, stride 2, 1536 -> 768 on 4x4) hold 42 MB and 19 MB of weights but produce
only 16 and 64 output positions per image. On CPU oneDNN's convolutions run such shapes far below
matrix-product speed and copy the transposed convolution's weight on every call. As ``unfold`` + a
matrix product (the 2x2 / stride-2 transposed convolution is a plain matrix product: its output
patches do not overlap) they read the weight where it lies and run at the machine's
matrix-product speed (BENCHMARKS.md has the figures). Same maths, parameters and state-dict keys
as the ``nn`` layers they subclass; only the summation order differs (rounding).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MatmulConv2d", "MatmulConvTranspose2x2"]


class MatmulConv2d(nn.Conv2d):
    """``nn.Conv2d`` (groups 1, zero padding) as ``unfold`` + one matrix product."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("MatmulConv2d supports groups=1 and numeric zero padding only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        out_h = (height + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        out_w = (width + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        columns = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C*k*k, L)
        out = torch.matmul(self.weight.flatten(1), columns)  # (B, O, L)
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(batch, self.out_channels, out_h, out_w)


class MatmulConvTranspose2x2(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(kernel_size=2, stride=2)`` as one matrix product over channels.

    Every input position writes its own 2x2 output patch, so the layer is a linear map of each
    position's channels followed by a pixel rearrangement. The input may be an NCHW view of an
    NHWC tensor (the SR decoder's case); the result is NCHW-shaped and NHWC in memory.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = False, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2, bias=bias, **kwargs)
        if self.groups != 1 or self.dilation != (1, 1) or self.padding != (0, 0) or self.output_padding != (0, 0):
            raise ValueError("MatmulConvTranspose2x2 supports groups=1, no dilation and no padding only")

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is not None:
            raise ValueError("MatmulConvTranspose2x2 has a fixed output size (2x the input)")
        batch, _, height, width = x.shape
        out = torch.matmul(x.permute(0, 2, 3, 1), self.weight.flatten(1))  # (B, H, W, O*2*2)
        out = out.view(batch, height, width, self.out_channels, 2, 2)
        out = out.permute(0, 1, 4, 2, 5, 3).reshape(batch, 2 * height, 2 * width, self.out_channels)
        if self.bias is not None:
            out = out + self.bias
        return out.permute(0, 3, 1, 2)
