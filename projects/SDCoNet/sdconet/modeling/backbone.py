"""timm's Swin Transformer as a detectron2 backbone, with the taps SDCoNet's SR decoder needs.

Outputs (NCHW, strides relative to the input; docs/method.md, "Shared Swin encoder"):

- ``patch_embed``: tokens after the 4x4 patch embedding and its LayerNorm (stride 4);
- ``stage1_raw``: stage-1 output with no extra norm (stride 4), a skip of the SR decoder;
- ``res2`` .. ``res5``: stage outputs, each through its own LayerNorm (strides 4, 8, 16, 32),
  like mmdet / the official detection Swin. Only the ``out_features`` asked for are built and
  returned, so no norm sits unused (DDP would complain about parameters without gradients).

Why the blocks are driven here rather than by ``stage(x)``: detection inputs give token grids
that are not multiples of the window (a 256 LR tile gives 64x64 tokens, window 7). timm pads
such grids but rolls *before* padding, so the shifted-window mask no longer separates the rows
and columns that wrapped around the border (huggingface/pytorch-image-models#2438): tokens at
the top edge attend to tokens at the bottom edge. :func:`swin_block_forward` pads first and then
rolls, as the official Swin and mmdet do. timm is still used for everything else: modules,
weights layout, window attention with its relative position bias, mask building and the
checkpoint conversion (:func:`timm.models.swin_transformer.checkpoint_filter_fn`).

The timm model is built with ``always_partition=True``: otherwise timm fixes windows and shifts
from its nominal 224 input (stage 4 at 7x7 tokens never shifts), whatever the real input is.
"""
import functools
import logging
import os
import re
from typing import Dict, List, NamedTuple, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from fvcore.common.checkpoint import get_missing_parameters_message, get_unexpected_parameters_message
from timm.models import load_state_dict
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    checkpoint_filter_fn,
)
from torch.utils.checkpoint import checkpoint

__all__ = [
    "TimmSwinBackbone",
    "SwinLoadReport",
    "build_timm_swin_backbone",
    "expand_path",
    "load_swin_weights",
    "missing_weights_message",
    "swin_block_forward",
]

logger = logging.getLogger(__name__)

RES_NAMES = ("res2", "res3", "res4", "res5")


@functools.lru_cache(maxsize=64)
def _window_rows(batch: int, height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int],
                 device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row maps between token order and window order, for ``batch`` grids of height x width.

    Token order lists the real tokens (b, h, w) first, then the padding tokens. Window order is
    the rows of the padded grid after the cyclic shift and the window partition. Returns
    ``to_windows`` (token row -> window row) and its inverse ``to_tokens``: both permutations of
    batch x padded-height x padded-width rows. Pad + roll + partition, and their undoing, are then
    one ``index_copy`` each instead of three or four copies.
    """
    (win_h, win_w), (shift_h, shift_w) = window, shift
    padded_h, padded_w = height + (-height) % win_h, width + (-width) % win_w
    h = torch.arange(padded_h, device=device)[:, None]
    w = torch.arange(padded_w, device=device)[None, :]
    # Rolling by -shift moves grid row h to (h - shift) mod padded size.
    h, w = (h - shift_h) % padded_h, (w - shift_w) % padded_w
    rows = ((h // win_h) * (padded_w // win_w) + w // win_w) * (win_h * win_w) + (h % win_h) * win_w + w % win_w
    per_image = padded_h * padded_w
    rows = rows[None] + torch.arange(batch, device=device)[:, None, None] * per_image  # (B, Hp, Wp)
    # Slices, not a boolean mask: no host sync on CUDA.
    to_windows = torch.cat([rows[:, :height, :width].flatten(), rows[:, :height, width:].flatten(),
                            rows[:, height:, :].flatten()])
    positions = torch.arange(to_windows.numel(), device=device)
    return to_windows, torch.empty_like(to_windows).scatter_(0, to_windows, positions)


# (window, shift, padded size, dtype, device) -> timm's shifted-window mask; a handful of entries.
_SHIFT_MASKS: Dict[tuple, torch.Tensor] = {}


def _shift_mask(block: SwinTransformerBlock, padded_h: int, padded_w: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """timm's shifted-window mask for a padded grid: it depends on the sizes only, so it is made once."""
    key = (tuple(block.window_size), tuple(block.shift_size), padded_h, padded_w, dtype, device)
    mask = _SHIFT_MASKS.get(key)
    if mask is None:
        if len(_SHIFT_MASKS) >= 64:  # many image sizes (tiling): start over rather than grow
            _SHIFT_MASKS.clear()
        mask = block.get_attn_mask(torch.empty(0, padded_h, padded_w, 0, dtype=dtype, device=device))
        _SHIFT_MASKS[key] = mask
    return mask


def shifted_window_attention(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """(Shifted) window attention of ``block`` on NHWC ``x`` of any size: pad, roll, attend, undo.

    Padding happens before the cyclic shift so that timm's mask (built for the padded grid)
    keeps the wrapped-around border tokens apart, as in the official Swin.

    Same result as timm's ``WindowAttention`` on the zero-padded grid, without its waste: a
    256 LR tile pads stage 3 from 16x16 to 21x21 tokens and stage 4 from 8x8 to 14x14, a fifth
    of Swin-T's FLOPs. The qkv projection of a zero padding token is the qkv bias alone, so only
    the real tokens are projected and the padding rows are the bias; the output projection runs
    on the real tokens only. Pad, roll and partition are one ``index_copy`` (:func:`_window_rows`).
    """
    attn = block.attn
    batch, height, width, channels = x.shape
    win_h, win_w = block.window_size
    shift = tuple(block.shift_size)
    to_windows, to_tokens = _window_rows(batch, height, width, tuple(block.window_size), shift, x.device)
    real_rows = batch * height * width
    qkv = attn.qkv(x).reshape(real_rows, -1)
    if to_windows.numel() > real_rows:  # padding rows hold the qkv of a zero token: the bias
        bias = attn.qkv.bias if attn.qkv.bias is not None else qkv.new_zeros(qkv.shape[1])
        rows = bias.to(qkv.dtype).expand(to_windows.numel(), -1)
    else:
        rows = qkv.new_empty(to_windows.numel(), qkv.shape[1])
    windows = rows.index_copy(0, to_windows[:real_rows], qkv).view(-1, win_h * win_w, qkv.shape[1])
    padded_h, padded_w = height + (-height) % win_h, width + (-width) % win_w
    mask = _shift_mask(block, padded_h, padded_w, qkv.dtype, x.device) if any(shift) else None
    windows = _window_attention_core(attn, windows, mask).view(-1, channels)
    tokens = windows.new_empty(windows.shape).index_copy(0, to_tokens, windows)[:real_rows]
    return attn.proj_drop(attn.proj(tokens.view(batch, height, width, channels)))


def _window_attention_core(attn, qkv: torch.Tensor, mask) -> torch.Tensor:
    """timm ``WindowAttention.forward`` between its qkv and output projections: multi-head
    attention with the relative position bias (and the shift mask) on (windows, N, 3C) qkv."""
    windows, tokens, _ = qkv.shape
    heads = attn.num_heads
    q, k, v = qkv.reshape(windows, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if attn.fused_attn:
        bias = attn._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            mask = mask.view(1, num_win, 1, tokens, tokens).expand(windows // num_win, -1, heads, -1, -1)
            bias = bias + mask.reshape(-1, heads, tokens, tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1) + attn._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            scores = scores.view(-1, num_win, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            scores = scores.view(-1, heads, tokens, tokens)
        out = attn.attn_drop(attn.softmax(scores)) @ v
    return out.transpose(1, 2).reshape(windows, tokens, -1)


def swin_block_forward(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """timm's Swin block (pre-norm attention + MLP residuals) with the pad-then-roll attention."""
    x = x + block.drop_path1(shifted_window_attention(block, block.norm1(x)))
    return x + block.drop_path2(block.mlp(block.norm2(x)))


def create_timm_swin(name: str, *, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                     num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                     drop_path_rate: float = 0.2, in_chans: int = 3) -> SwinTransformer:
    """A randomly initialised timm Swin (never downloads); ``name="custom"`` uses the widths given."""
    common = dict(num_classes=0, global_pool="", in_chans=in_chans, drop_path_rate=drop_path_rate,
                  strict_img_size=False, always_partition=True)
    if name == "custom":
        return SwinTransformer(patch_size=4, embed_dim=embed_dim, depths=tuple(depths),
                               num_heads=tuple(num_heads), window_size=window_size, **common)
    return timm.create_model(name, pretrained=False, **common)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


class TimmSwinBackbone(Backbone):
    """Swin (timm modules) returning the patch-embed / stage-1 taps and normalised res2..res5.

    Args:
        name: timm model name, or "custom" to use ``embed_dim`` / ``depths`` / ``num_heads`` /
            ``window_size``.
        out_features: which of res2..res5 to normalise and return (the taps are always returned).
        freeze_at: 0 = nothing frozen; 1 = patch embedding; k >= 2 = patch embedding and stages
            1..k-1 with their output norms (detectron2 meaning: everything that computes res2..res{k}).
            Frozen modules stay in eval mode, so drop path is off there.
        use_checkpoint: recompute each Swin block in backward (training only) to save memory.
    """

    def __init__(self, name: str = "swin_tiny_patch4_window7_224", *, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, drop_path_rate: float = 0.2,
                 out_features: Sequence[str] = ("res3", "res4", "res5"), freeze_at: int = 0,
                 use_checkpoint: bool = False, in_chans: int = 3):
        super().__init__()
        unknown = [f for f in out_features if f not in RES_NAMES]
        if unknown:
            raise ValueError(f"Unknown Swin out_features {unknown}; choose from {RES_NAMES}")
        swin = create_timm_swin(name, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                                window_size=window_size, drop_path_rate=drop_path_rate, in_chans=in_chans)
        if len(swin.layers) != len(RES_NAMES):
            raise ValueError(f"Swin must have {len(RES_NAMES)} stages (res2..res5), got depths {tuple(depths)}")
        # Same attribute names as timm / the official Swin, so checkpoints map onto them.
        self.patch_embed = swin.patch_embed
        self.layers = swin.layers
        self.patch_size = self.patch_embed.patch_size
        self.use_checkpoint = use_checkpoint

        stage_channels = [info["num_chs"] for info in swin.feature_info]
        stage_strides = [info["reduction"] for info in swin.feature_info]
        self._out_feature_channels = {"patch_embed": stage_channels[0], "stage1_raw": stage_channels[0]}
        self._out_feature_strides = {"patch_embed": stage_strides[0], "stage1_raw": stage_strides[0]}
        for index, res in enumerate(RES_NAMES):
            if res in out_features:
                self.add_module(f"norm{index}", nn.LayerNorm(stage_channels[index]))
                self._out_feature_channels[res] = stage_channels[index]
                self._out_feature_strides[res] = stage_strides[index]
        self._out_features = ["patch_embed", "stage1_raw"] + [r for r in RES_NAMES if r in out_features]
        self._frozen_modules: List[nn.Module] = []
        self._freeze_stages(freeze_at)

    @property
    def size_divisibility(self) -> int:
        """32 = the stride of res5. Windows need no extra divisibility: each block pads to its
        window itself, so padding images to 32 * window (224) would only waste compute."""
        return 32

    def _freeze_stages(self, freeze_at: int) -> None:
        """Stop gradients into the patch embedding and the first ``freeze_at - 1`` stages (once, at build)."""
        if not 0 <= freeze_at <= len(self.layers) + 1:
            raise ValueError(f"freeze_at={freeze_at} must lie in [0, {len(self.layers) + 1}]")
        modules = [self.patch_embed] if freeze_at >= 1 else []
        for index in range(freeze_at - 1):
            modules.append(self.layers[index])
            if hasattr(self, f"norm{index}"):
                modules.append(getattr(self, f"norm{index}"))
        for module in modules:
            module.requires_grad_(False)
            module.eval()
        self._frozen_modules = modules

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_modules:
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        pad_h, pad_w = (-x.shape[-2]) % self.patch_size[0], (-x.shape[-1]) % self.patch_size[1]
        if pad_h or pad_w:  # bottom / right, like mmdet's corner padding
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed(x)  # NHWC, patch embedding + LayerNorm
        outputs = {"patch_embed": _nchw(x)}
        for index, stage in enumerate(self.layers):
            x = stage.downsample(x)  # identity for stage 1, patch merging (timm layout) after
            for block in stage.blocks:
                if self.use_checkpoint and self.training:
                    x = checkpoint(swin_block_forward, block, x, use_reentrant=False)
                else:
                    x = swin_block_forward(block, x)
            if index == 0:
                outputs["stage1_raw"] = _nchw(x)
            if RES_NAMES[index] in self._out_feature_channels:
                outputs[RES_NAMES[index]] = _nchw(getattr(self, f"norm{index}")(x))
        return outputs


class SwinLoadReport(NamedTuple):
    """What :func:`load_swin_weights` did, by model key (after conversion).

    ``missing_keys`` includes the ``mismatched_keys`` (skipped for their shape) and the res output
    norms ``norm1``.. that classification checkpoints do not have. ``resized_keys`` were
    interpolated by timm to the model's shape (relative position tables of another window)."""

    missing_keys: List[str]
    unexpected_keys: List[str]
    mismatched_keys: List[str]
    loaded_keys: List[str]
    resized_keys: List[str]


# Keys of ImageNet classification checkpoints that a detection backbone has no use for.
_CLASSIFIER_PREFIXES = ("head.", "norm.")


def load_swin_weights(backbone: TimmSwinBackbone, path: str) -> SwinLoadReport:
    """Load a LOCAL Swin checkpoint (official Microsoft ``.pth`` or timm keys) into ``backbone``.

    timm's own converter (:func:`checkpoint_filter_fn`) moves the official per-stage downsample to
    timm's layout, renames ``head`` to ``head.fc``, drops the ``relative_position_index`` /
    ``attn_mask`` buffers and resizes (bicubic) relative position tables of another window size
    and patch embeddings of another patch size. Tensors whose shape still differs are skipped.
    The counts go to the log: INFO when only the expected keys differ (classifier ``head`` /
    ``norm`` unused, res norms new), WARNING when Swin tensors stay at their random init.
    """
    raw = load_state_dict(path, use_ema=False)
    try:
        state_dict = checkpoint_filter_fn(raw, backbone)
    except AttributeError as e:  # a table for a block the model does not have
        raise ValueError(f"{path} does not fit the Swin of MODEL.SDCONET.SWIN (another variant?): {e}") from e
    own = backbone.state_dict()
    resized = sorted(k for k, v in state_dict.items() if k in raw and raw[k].shape != v.shape)
    mismatched = sorted(k for k, v in state_dict.items() if k in own and own[k].shape != v.shape)
    for key in mismatched:
        logger.warning(f"Skip loading parameter '{key}': shape {tuple(state_dict.pop(key).shape)} in the "
                       f"checkpoint, {tuple(own[key].shape)} in the model.")
    incompatible = backbone.load_state_dict(state_dict, strict=False)
    report = SwinLoadReport(sorted(incompatible.missing_keys), sorted(incompatible.unexpected_keys), mismatched,
                            sorted(k for k in state_dict if k in own), resized)
    absent = [k for k in report.missing_keys if k not in mismatched]
    new_norms = [k for k in absent if re.fullmatch(r"norm\d+\.(weight|bias)", k)]
    classifier = [k for k in report.unexpected_keys if k.startswith(_CLASSIFIER_PREFIXES)]
    logger.info(
        f"Swin weights from {path}: loaded {len(report.loaded_keys)} of {len(own)} backbone tensors; "
        f"missing {len(absent)} ({len(new_norms)} of them the new res output norms, which start as identity "
        f"LayerNorms); skipped {len(report.unexpected_keys)} unexpected ({len(classifier)} of them the "
        f"classifier's head / norm) and {len(mismatched)} of another shape (left at their random init); "
        f"{len(resized)} resized by timm's checkpoint_filter_fn (relative position tables of another window "
        "size are interpolated, not dropped)")
    lost = [k for k in absent if k not in new_norms]
    if lost:
        logger.warning(get_missing_parameters_message(lost))
    unused = [k for k in report.unexpected_keys if k not in classifier]
    if unused:
        logger.warning(get_unexpected_parameters_message(unused))
    return report


# MODEL.SDCONET.SWIN.PRETRAINED value that starts a named Swin from random weights on purpose.
NO_PRETRAINED = "none"


def expand_path(value: str) -> str:
    """``value`` with ``$VAR`` / ``${VAR}`` and ``~`` expanded (an unset variable stays as written)."""
    return os.path.expanduser(os.path.expandvars(value))


def missing_weights_message(name: str, value: str) -> str:
    """Why a named Swin refuses to start without ImageNet weights, and how to provide them."""
    path = expand_path(value)
    unset = sorted({a or b for a, b in re.findall(r"\$\{(\w+)\}|\$(\w+)", value)} - set(os.environ))
    if value:
        problem = f"there is no file {path!r}" + (f" (PRETRAINED={value!r})" if path != value else "")
        if unset:
            problem += f"; {', '.join('$' + v for v in unset)} is not set"
    else:
        problem = "PRETRAINED is empty"
    if name == "custom":
        get = "Save a state dict of this Swin (official or timm key names) there"
    else:
        file_name = f"{name.split('.')[0]}.pth"
        get = (f"Download the official {file_name} from the Swin Transformer GitHub release "
               f"(https://github.com/SwinTransformer/storage/releases/download/v1.0.0/{file_name}), or save "
               f"timm's weights with torch.save(timm.create_model({name!r}, pretrained=True).state_dict(), "
               f"{file_name!r}). Put the file in a folder and `export SDCONET_WEIGHTS=<that folder>` (the "
               f"configs read $SDCONET_WEIGHTS/{file_name}), or set MODEL.SDCONET.SWIN.PRETRAINED to its path")
    return (f"MODEL.SDCONET.SWIN.PRETRAINED: no ImageNet weights for the Swin {name!r}: {problem}. {get}. "
            f"To train from scratch on purpose: MODEL.SDCONET.SWIN.PRETRAINED {NO_PRETRAINED}.")


@BACKBONE_REGISTRY.register()
def build_timm_swin_backbone(cfg, input_shape: ShapeSpec) -> TimmSwinBackbone:
    """detectron2 entry point: ``cfg.MODEL.BACKBONE.NAME = "build_timm_swin_backbone"``.

    MODEL.SDCONET.SWIN.PRETRAINED: a local checkpoint path (``$VAR`` and ``~`` expanded), or
    "none" for random weights (with a warning). A named timm Swin without a readable file is an
    error that says what to download: ImageNet weights should never be forgotten silently. A
    "custom" Swin (tiny test configs) starts from random weights when PRETRAINED is "". When
    MODEL.WEIGHTS is set, a full checkpoint overwrites the backbone anyway, so a missing file is
    only logged.
    """
    s = cfg.MODEL.SDCONET.SWIN
    backbone = TimmSwinBackbone(
        s.NAME, embed_dim=s.EMBED_DIM, depths=s.DEPTHS, num_heads=s.NUM_HEADS,
        window_size=s.WINDOW_SIZE, drop_path_rate=s.DROP_PATH_RATE, out_features=s.OUT_FEATURES,
        freeze_at=s.FREEZE_AT, use_checkpoint=s.USE_CHECKPOINT, in_chans=input_shape.channels)
    if s.PRETRAINED is None or s.PRETRAINED.strip().lower() == NO_PRETRAINED:  # yacs reads `None` as None
        logger.warning(f"MODEL.SDCONET.SWIN.PRETRAINED {s.PRETRAINED}: the Swin {s.NAME!r} starts from random "
                       "weights (no ImageNet initialisation)")
        return backbone
    if not s.PRETRAINED and s.NAME == "custom":
        return backbone
    path = expand_path(s.PRETRAINED)
    if s.PRETRAINED and os.path.isfile(path):
        load_swin_weights(backbone, path)
    elif cfg.MODEL.WEIGHTS:
        logger.info(f"No Swin ImageNet weights loaded (PRETRAINED={s.PRETRAINED!r} is not a file): "
                    f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} provides the backbone")
    else:
        raise FileNotFoundError(missing_weights_message(s.NAME, s.PRETRAINED))
    return backbone
