"""SDCoNet's super-resolution branch: a U-Net of Swin blocks on the shared Swin encoder.

It is an auxiliary, training-only task: SR gradients shape the shared encoder, and inference
never runs it. The method: docs/method.md, SR branch. The release's bugs are fixed (docs/method.md,
Differences from the authors' release):

- the reconstruction head takes the decoder width (``embed_dim`` channels), not ``embed_dim // 24``;
- the bottleneck is flattened to tokens with ``flatten(2).transpose(1, 2)``, not a scrambling ``view``;
- the release learns the image only up to LR/2 and upsamples bilinearly the rest: ``head="x2_bilinear"``
  keeps that, ``"residual"`` (default) and ``"full"`` learn at the HR resolution;
- no SwinIR RGB mean is added: the target is the mean/std-normalised HR tensor.

Data flow (Swin-T widths, 256x256 LR; C x H x W):
res5 768x8x8 -> bottleneck conv s2 + GN 1536x4x4 -> [expand, + skip, Swin blocks] x4:
768x8x8 (+res5), 384x16x16 (+res4), 192x32x32 (+res3), 96x64x64 (+stage1_raw) -> + patch_embed, LN
-> one of three heads:
- "residual" (default): PixelShuffle(4) 32x256x256 + conv(LR pixels) -> conv -> PixelShuffle(2)
  3x512x512, added to the bicubic upsampling of the LR input (see :class:`ResidualHead`);
- "x2_bilinear" (release): 3x128x128 learned, then bilinear to 3x512x512. Whatever it learns, it
  is a bilinear upsampling of an HR/4 image, so it cannot beat the best such image
  (``tools/sr_head_ceiling.py``: 33.3 dB on the synthetic test tiles, where bicubic gives 40.7);
- "full": 3x512x512 learned by PixelShuffle(2) stages, no image skip.

Tensors between Swin blocks are NHWC, the layout the timm blocks work in.
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformerBlock

from ..layers.matmul_conv import MatmulConv2d, MatmulConvTranspose2x2
from .backbone import swin_block_forward

__all__ = ["SRDecoder", "SR_HEADS", "build_sr_decoder"]

SR_HEADS = ("residual", "x2_bilinear", "full")
# Skip taps of the backbone, deepest first; each is added after the matching expand stage.
SKIP_FEATURES = ("res5", "res4", "res3", "stage1_raw")
# Channels of the hidden layers of the "x2_bilinear" and "full" heads (the release uses 16).
HEAD_FEATURES = 16
# Backbone stride of the decoder's last token grid (patch embedding: 4).
TOKEN_STRIDE = 4


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class ExpandStage(nn.Module):
    """LayerNorm + ConvTranspose2d(k2, s2) halving the channels, skip add, then Swin blocks (NHWC)."""

    def __init__(self, in_dim: int, blocks: Sequence[SwinTransformerBlock]):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.expand = MatmulConvTranspose2x2(in_dim, in_dim // 2, bias=False)  # = nn.ConvTranspose2d(k2, s2)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.expand(_nchw(self.norm(x)))
        if x.shape[-2:] != skip.shape[-2:]:
            # Odd token grids: the encoder rounds up when it halves, so doubling overshoots.
            # Follow the skip's grid, which is the one aligned with the image (and patch_embed).
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = _nhwc(x + skip).contiguous()
        for block in self.blocks:
            x = swin_block_forward(block, x)
        return x


class ResidualHead(nn.Module):
    """Bicubic upsampling of the LR input plus a learned residual at the full HR resolution.

    Why: with no image-level skip the decoder must rebuild the whole image from LayerNorm'd
    4x4 patch tokens, and the release head only learns it on a quarter-resolution grid (a PSNR
    ceiling below plain bicubic). Here bicubic carries the low frequencies and the network only
    adds detail. Two inputs feed the residual, both at LR resolution: the decoder's tokens
    (PixelShuffle x4 from the stride-4 grid) and a shallow convolution of the LR pixels themselves
    (SwinIR's shallow feature path); then ``body_convs`` 3x3 convolutions and a PixelShuffle(scale)
    straight to the 3 HR channels (SwinIR's light "pixelshuffledirect"). That last convolution
    starts at zero, so at initialisation the branch is exactly bicubic.
    """

    def __init__(self, token_dim: int, scale: int, features: int = 32, body_convs: int = 1):
        super().__init__()
        if features < 1 or body_convs < 0:
            raise ValueError(f"residual head needs features >= 1 and body_convs >= 0, got {features}, {body_convs}")
        self.scale = int(scale)
        self.from_tokens = nn.Sequential(
            nn.Conv2d(token_dim, features * TOKEN_STRIDE ** 2, 1), nn.PixelShuffle(TOKEN_STRIDE))
        self.from_pixels = nn.Conv2d(3, features, 3, padding=1)
        body = []
        for _ in range(body_convs):
            body += [nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(features, features, 3, padding=1)]
        self.body = nn.Sequential(*body, nn.LeakyReLU(0.2, inplace=True))
        self.to_residual = nn.Sequential(nn.Conv2d(features, 3 * self.scale ** 2, 3, padding=1),
                                          nn.PixelShuffle(self.scale))
        nn.init.zeros_(self.to_residual[0].weight)
        nn.init.zeros_(self.to_residual[0].bias)

    def forward(self, tokens: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, C, h/4, w/4) NCHW, ``lr`` (B, 3, h, w) normalised -> (B, 3, s*h, s*w)."""
        upsampled = self.from_tokens(tokens)
        if upsampled.shape[-2:] != lr.shape[-2:]:
            # The token grid rounds up when the LR batch is not a multiple of 4: crop to the image.
            upsampled = upsampled[..., : lr.shape[-2], : lr.shape[-1]]
        residual = self.to_residual(self.body(upsampled + self.from_pixels(lr)))
        bicubic = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return bicubic + residual


class SRDecoder(nn.Module):
    """Swin U-Net decoder reconstructing the normalised HR image from the shared Swin features.

    Args:
        embed_dim: width of the backbone's stage 1 (patch_embed channels); the decoder widths
            are 8, 4, 2, 1 times it, and the bottleneck 16 times it.
        depths: Swin blocks per decoder stage (deepest first).
        num_heads: attention heads per decoder stage; each must divide its stage width. Empty =
            derive ``max(1, width // 32)`` (head dim 32), for tiny widths.
        window_size: attention window in tokens (shifted by half on odd blocks).
        mlp_ratio: MLP hidden width / block width.
        drop_path_rate: stochastic depth, linearly increasing from 0 over all decoder blocks.
        head: "residual" (bicubic of the LR input + a learned full-resolution residual, see
            :class:`ResidualHead`), "x2_bilinear" (release: learned to LR/2, then bilinear to HR)
            or "full" (learned all the way to HR by PixelShuffle(2) stages).
        scale: degradation scale s (HR = s * LR).
        residual_features, residual_convs: width and 3x3 body depth of the "residual" head.
    """

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 6, 2, 2),
                 num_heads: Sequence[int] = (6, 12, 6, 3), window_size: int = 8,
                 mlp_ratio: float = 2.0, drop_path_rate: float = 0.1, head: str = "residual",
                 scale: int = 2, residual_features: int = 32, residual_convs: int = 1):
        super().__init__()
        if head not in SR_HEADS:
            raise ValueError(f"head must be one of {SR_HEADS}, got {head!r}")
        if len(depths) != len(SKIP_FEATURES):
            raise ValueError(f"depths needs {len(SKIP_FEATURES)} stages, got {tuple(depths)!r}")
        widths = [embed_dim * 8 // 2 ** i for i in range(len(SKIP_FEATURES))]  # 768, 384, 192, 96
        bottleneck_dim = 2 * widths[0]
        if bottleneck_dim % 32:
            raise ValueError(f"SR bottleneck width 16 * embed_dim = {bottleneck_dim} must be a multiple "
                             f"of 32 for GroupNorm(32); use an even backbone embed_dim (got {embed_dim})")
        num_heads = tuple(num_heads) or tuple(max(1, w // 32) for w in widths)
        if len(num_heads) != len(widths) or any(w % h for w, h in zip(widths, num_heads)):
            raise ValueError(f"num_heads={num_heads!r} needs one value per stage dividing the stage widths "
                             f"{tuple(widths)} (embed_dim {embed_dim}); leave it empty to derive head dim 32")
        learned_factor = {"x2_bilinear": 2, "full": TOKEN_STRIDE * scale, "residual": scale}[head]
        if head == "full" and learned_factor & (learned_factor - 1):
            raise ValueError(f"SR head 'full' needs a power-of-two 4 * scale, got scale {scale}")
        self.embed_dim = embed_dim
        self.widths = tuple(widths)
        self.num_heads = num_heads
        self.head_mode = head
        self.scale = int(scale)
        self.learned_factor = learned_factor

        # The release's SR bottleneck (in its neck): kept here so it is frozen / skipped with the SR branch.
        self.bottleneck = nn.Sequential(
            MatmulConv2d(widths[0], bottleneck_dim, kernel_size=3, stride=2, padding=1, bias=False),
            nn.GroupNorm(32, bottleneck_dim),
        )
        drop_path = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, first = [], 0
        for width, depth, heads in zip(widths, depths, num_heads):
            blocks = [
                SwinTransformerBlock(
                    width, input_resolution=(window_size, window_size), num_heads=heads,
                    window_size=window_size, shift_size=0 if i % 2 == 0 else window_size // 2,
                    always_partition=True, dynamic_mask=True, mlp_ratio=mlp_ratio,
                    drop_path=drop_path[first + i])
                for i in range(depth)
            ]
            stages.append(ExpandStage(2 * width, blocks))
            first += depth
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(widths[-1])

        if head == "residual":
            self.head = ResidualHead(widths[-1], scale, residual_features, residual_convs)
        else:
            self.head = self._release_head(widths[-1], learned_factor)
        self.apply(self._init_linear)

    @staticmethod
    def _release_head(width: int, learned_factor: int) -> nn.Sequential:
        """SwinIR "pixelshuffle" reconstruction, input = the decoder width (bug 4 fixed)."""
        upsample = []
        for _ in range(int(math.log2(learned_factor))):
            upsample += [nn.Conv2d(HEAD_FEATURES, 4 * HEAD_FEATURES, 3, padding=1), nn.PixelShuffle(2)]
        return nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),  # conv_after_body
            nn.Conv2d(width, HEAD_FEATURES, 3, padding=1),  # conv_before_upsample
            nn.LeakyReLU(inplace=True),
            *upsample,
            nn.Conv2d(HEAD_FEATURES, 3, 3, padding=1),  # conv_last
        )

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        """Swin / SwinIR init for the token MLPs and projections (timm blocks leave torch's default)."""
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, features: Dict[str, torch.Tensor], lr: torch.Tensor, hr_size: Tuple[int, int]) -> torch.Tensor:
        """SR image (B, 3, *hr_size) in normalised HR space from the backbone's output dict and
        the normalised LR batch the backbone saw (only the "residual" head reads its pixels)."""
        missing = [k for k in ("patch_embed", *SKIP_FEATURES) if k not in features]
        if missing:
            raise KeyError(f"SRDecoder needs backbone features {missing}: the backbone must output "
                           f"{('patch_embed', *SKIP_FEATURES)}")
        x = _nhwc(self.bottleneck(features["res5"]))  # flatten(2).transpose(1, 2) as a grid
        for stage, skip_name in zip(self.stages, SKIP_FEATURES):
            x = stage(x, features[skip_name])
        x = _nchw(self.norm(x + _nhwc(features["patch_embed"]))).contiguous()  # long skip
        if self.head_mode == "residual":
            sr = self.head(x, lr)
        else:
            sr = self.head(x)
        if self.head_mode == "x2_bilinear":
            # LR/2 -> HR. The encoder pads the image at the bottom / right, so scale the grid by
            # the exact factor and crop (identical to resizing to hr_size when sizes divide).
            sr = F.interpolate(sr, scale_factor=TOKEN_STRIDE * self.scale // 2, mode="bilinear",
                               align_corners=False)
        if sr.shape[-2] < hr_size[0] or sr.shape[-1] < hr_size[1]:
            raise ValueError(f"SR output {tuple(sr.shape[-2:])} smaller than the HR size {tuple(hr_size)}: "
                             f"is the decoder's scale {self.scale} the HR/LR ratio?")
        return sr[..., : hr_size[0], : hr_size[1]]

    @staticmethod
    def loss(sr: torch.Tensor, hr: torch.Tensor, valid_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean L1 between ``sr`` and the normalised ``hr``; ``valid_mask`` (B, H, W) excludes
        batch padding. The caller applies ``MODEL.SDCONET.SR.LOSS_WEIGHT``."""
        error = (sr - hr).abs()
        if valid_mask is None:
            return error.mean()
        mask = valid_mask.to(error.dtype).unsqueeze(1)
        return (error * mask).sum() / (mask.sum() * error.shape[1]).clamp(min=1.0)


def build_sr_decoder(cfg, embed_dim: Optional[int] = None) -> SRDecoder:
    """The SR decoder of ``cfg.MODEL.SDCONET.SR``. ``embed_dim`` = the backbone's patch_embed
    channels; omitted, it is ``SWIN.EMBED_DIM`` for a custom Swin (timm names fix it, so pass it then)."""
    s = cfg.MODEL.SDCONET
    if embed_dim is None:
        if s.SWIN.NAME != "custom":
            raise ValueError("build_sr_decoder needs embed_dim for a timm Swin "
                             f"(MODEL.SDCONET.SWIN.NAME={s.SWIN.NAME!r}): pass "
                             "backbone.output_shape()['patch_embed'].channels")
        embed_dim = s.SWIN.EMBED_DIM
    return SRDecoder(embed_dim, depths=tuple(s.SR.DEPTHS), num_heads=tuple(s.SR.NUM_HEADS),
                     window_size=s.SR.WINDOW_SIZE, mlp_ratio=s.SR.MLP_RATIO,
                     drop_path_rate=s.SR.DROP_PATH_RATE, head=s.SR.HEAD, scale=s.DEGRADE.SCALE,
                     residual_features=s.SR.RESIDUAL_FEATURES, residual_convs=s.SR.RESIDUAL_CONVS)
