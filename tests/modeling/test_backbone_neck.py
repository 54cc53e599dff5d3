"""Swin backbone (timm) and the FPN / ChannelMapper necks: shapes, freezing, weight loading."""
import logging
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from sdconet.config import add_sdconet_config
from sdconet.modeling.backbone import (
    TimmSwinBackbone,
    _window_rows,
    create_timm_swin,
    load_swin_weights,
    shifted_window_attention,
)
from sdconet.modeling.neck import FPN, ChannelMapper, build_neck
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch.utils.flop_counter import FlopCounterMode

TINY = dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4), window_size=7)
ALL_RES = ("res2", "res3", "res4", "res5")
CHANNELS = {"patch_embed": 24, "stage1_raw": 24, "res2": 24, "res3": 48, "res4": 96, "res5": 192}
STRIDES = {"patch_embed": 4, "stage1_raw": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32}


def tiny_swin(**kwargs):
    return TimmSwinBackbone("custom", **{**TINY, "drop_path_rate": 0.0, **kwargs})


def tiny_cfg():
    cfg = get_cfg()
    add_sdconet_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_timm_swin_backbone"
    swin = cfg.MODEL.SDCONET.SWIN
    swin.NAME = "custom"
    swin.EMBED_DIM, swin.DEPTHS, swin.NUM_HEADS = TINY["embed_dim"], TINY["depths"], TINY["num_heads"]
    cfg.MODEL.SDCONET.NECK.OUT_CHANNELS = 32
    return cfg


# ---------------------------------------------------------------------------- backbone
@pytest.mark.parametrize("size", [(256, 256), (96, 160)])
def test_outputs_names_shapes_and_strides(size):
    torch.manual_seed(0)
    backbone = tiny_swin(out_features=ALL_RES).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, *size))
    shapes = backbone.output_shape()
    assert list(out) == ["patch_embed", "stage1_raw", *ALL_RES]
    assert set(shapes) == set(out)
    for name, tensor in out.items():
        assert (shapes[name].channels, shapes[name].stride) == (CHANNELS[name], STRIDES[name])
        assert tensor.shape == (2, CHANNELS[name], size[0] // STRIDES[name], size[1] // STRIDES[name])
    # res2 is stage 1 through its own LayerNorm; stage1_raw is not normalised
    norm0 = backbone.norm0
    expected = F.layer_norm(out["stage1_raw"].permute(0, 2, 3, 1), (24,), norm0.weight, norm0.bias)
    torch.testing.assert_close(out["res2"], expected.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["stage1_raw"], out["res2"], atol=1e-2)


def test_input_not_divisible_by_the_patch_is_padded_bottom_right():
    backbone = tiny_swin().eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 66, 50))
    assert out["stage1_raw"].shape[-2:] == (17, 13) and out["res5"].shape[-2:] == (3, 2)


def test_default_out_features_build_no_unused_norm():
    backbone = tiny_swin()
    assert set(backbone.output_shape()) == {"patch_embed", "stage1_raw", "res3", "res4", "res5"}
    assert not hasattr(backbone, "norm0") and hasattr(backbone, "norm3")
    assert backbone.size_divisibility == 32
    with pytest.raises(ValueError, match="res6"):
        tiny_swin(out_features=("res3", "res6"))


def test_window_attention_matches_timm_on_whole_windows_and_does_not_wrap_when_padded():
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=8, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3,
                                 always_partition=True, dynamic_mask=True).eval()
    whole = torch.randn(2, 14, 14, 8)
    torch.testing.assert_close(shifted_window_attention(block, whole), block._attn(whole))

    # A 256 LR tile gives 64x64 tokens, padded to 70. Row 0 wraps round to the bottom in the shifted
    # block; it must only share its window with rows 0..2 (the rest of that window is padding).
    grid = torch.randn(1, 64, 64, 8)
    bumped = grid.clone()
    bumped[0, 0, 30] += 5.0
    change = (shifted_window_attention(block, bumped) - shifted_window_attention(block, grid)).abs()
    assert torch.nonzero(change.sum((0, 2, 3)) > 1e-6).flatten().tolist() == [0, 1, 2]
    assert torch.nonzero(change.sum((0, 1, 3)) > 1e-6).flatten().tolist() == list(range(24, 31))


def attention_on_the_zero_padded_grid(block, x):
    """The textbook order: zero-pad the tokens, roll, timm's whole WindowAttention, undo, crop."""
    _, height, width, channels = x.shape
    win_h, win_w = block.window_size
    x = F.pad(x, (0, 0, 0, (-width) % win_w, 0, (-height) % win_h))
    shift = block.shift_size
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    mask = block.get_attn_mask(x) if any(shift) else None
    windows = window_partition(x, block.window_size).view(-1, win_h * win_w, channels)
    windows = block.attn(windows, mask=mask).view(-1, win_h, win_w, channels)
    x = window_reverse(windows, block.window_size, x.shape[1], x.shape[2])
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    return x[:, :height, :width, :]


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("size", [(16, 16), (8, 8), (9, 13), (14, 14)])
def test_padding_tokens_are_not_projected_but_the_result_is_unchanged(shift, size):
    """Only real tokens go through qkv / proj; values and gradients match the padded computation."""
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=12, input_resolution=(7, 7), num_heads=3, window_size=7, shift_size=shift,
                                 always_partition=True, dynamic_mask=True).eval()
    x = torch.randn(2, *size, 12, requires_grad=True)
    with FlopCounterMode(display=False) as ours_flops:
        ours = shifted_window_attention(block, x)
    with FlopCounterMode(display=False) as reference_flops:
        reference = attention_on_the_zero_padded_grid(block, x)
    # qkv (12 -> 36) and proj (12 -> 12) on the real tokens, attention on the whole padded windows.
    real_tokens = 2 * size[0] * size[1]
    windows = 2 * math.ceil(size[0] / 7) * math.ceil(size[1] / 7)
    assert ours_flops.get_total_flops() == 2 * real_tokens * 12 * 48 + 2 * (2 * windows * 49 * 49 * 12)
    padded = size[0] % 7 or size[1] % 7
    assert (ours_flops.get_total_flops() < reference_flops.get_total_flops()) == bool(padded)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    inputs = [x, *block.attn.parameters()]
    for got, want in zip(torch.autograd.grad(ours.square().sum(), inputs),
                         torch.autograd.grad(reference.square().sum(), inputs)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size, shift", [((9, 13), (3, 3)), ((14, 14), (0, 0)), ((8, 8), (3, 3)), ((64, 64), (3, 3))])
def test_window_rows_are_pad_roll_partition_as_one_permutation(size, shift):
    """Token ids put through the row map land where zero-pad + roll + window_partition put them."""
    h, w = size
    ids = torch.arange(1, 2 * h * w + 1, dtype=torch.float64).view(2, h, w, 1)  # padding: 0
    grid = torch.roll(F.pad(ids, (0, 0, 0, (-w) % 7, 0, (-h) % 7)), shifts=(-shift[0], -shift[1]), dims=(1, 2))
    expected = window_partition(grid, (7, 7)).reshape(-1)
    to_windows, to_tokens = _window_rows(2, h, w, (7, 7), shift, torch.device("cpu"))
    rows = to_windows.numel()
    assert rows == expected.numel() and torch.equal(to_windows.sort().values, torch.arange(rows))
    assert torch.equal(to_tokens[to_windows], torch.arange(rows))
    placed = torch.zeros(rows, dtype=torch.float64).index_copy(0, to_windows[: 2 * h * w], ids.reshape(-1))
    assert torch.equal(placed, expected)


@pytest.mark.parametrize("freeze_at, frozen_prefixes", [
    (0, ()),
    (1, ("patch_embed.",)),
    (3, ("patch_embed.", "layers.0.", "layers.1.", "norm0.", "norm1.")),
])
def test_freeze_at(freeze_at, frozen_prefixes):
    torch.manual_seed(0)
    backbone = tiny_swin(out_features=ALL_RES, freeze_at=freeze_at, drop_path_rate=0.1).train()
    out = backbone(torch.randn(1, 3, 64, 64))
    sum(o.square().mean() for o in out.values()).backward()
    for name, param in backbone.named_parameters():
        frozen = name.startswith(frozen_prefixes)
        assert param.requires_grad is not frozen, name
        assert (param.grad is None) is frozen, name
    assert backbone.patch_embed.training is (freeze_at == 0)
    assert backbone.layers[1].training is (freeze_at < 3)
    assert backbone.layers[2].training


def test_freeze_at_out_of_range():
    with pytest.raises(ValueError, match="freeze_at"):
        tiny_swin(freeze_at=6)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = tiny_swin().train()
    recomputed = tiny_swin(use_checkpoint=True).train()
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for model in (plain, recomputed):
        sum(o.square().mean() for o in model(x).values()).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# ---------------------------------------------------------------------------- weights
def official_key(timm_features_key):
    """timm features_only name -> official Swin name: ``layers_N`` -> ``layers.N``, and the patch
    merging that timm runs at the start of stage N sits at the end of stage N-1 officially."""
    match = re.fullmatch(r"layers_(\d+)\.(downsample\.)?(.*)", timm_features_key)
    if match is None:
        return timm_features_key
    stage = int(match[1]) - (1 if match[2] else 0)
    return f"layers.{stage}.{match[2] or ''}{match[3]}"


def test_load_official_swin_checkpoint(tmp_path, caplog):
    torch.manual_seed(1)
    source = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, features_only=True, **TINY)
    weights = source.state_dict()
    official = {official_key(k): v for k, v in weights.items()}
    assert "layers.0.downsample.reduction.weight" in official and "layers.3.downsample.norm.weight" not in official
    # official checkpoints also store these buffers, the final norm and the classifier
    official.update({official_key(k): b for k, b in source.named_buffers()
                     if k.endswith(("relative_position_index", "attn_mask"))})
    assert "layers.0.blocks.0.attn.relative_position_index" in official
    official.update({"norm.weight": torch.ones(192), "norm.bias": torch.zeros(192),
                     "head.weight": torch.randn(1000, 192), "head.bias": torch.zeros(1000)})
    path = tmp_path / "swin_official.pth"
    torch.save({"model": official}, path)

    cfg = tiny_cfg()
    cfg.MODEL.SDCONET.SWIN.PRETRAINED = str(path)
    fresh = tiny_swin()
    assert not torch.equal(fresh.patch_embed.proj.weight, weights["patch_embed.proj.weight"])
    with caplog.at_level(logging.INFO, logger="sdconet.modeling.backbone"):
        backbone = build_backbone(cfg)
    loaded = backbone.state_dict()
    for key, value in weights.items():
        torch.testing.assert_close(loaded[key.replace("layers_", "layers.")], value, rtol=0, atol=0, msg=key)
    # Only the expected differences: the classifier is unused and the res norms are new (no warning).
    assert f"loaded {len(weights)} of {len(loaded)} backbone tensors; missing 6 (6 of them the new res" in caplog.text
    assert "skipped 4 unexpected (4 of them the classifier's head / norm) and 0 of another shape" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    report = load_swin_weights(fresh, str(path))
    assert report.unexpected_keys == ["head.fc.bias", "head.fc.weight", "norm.bias", "norm.weight"]
    assert report.missing_keys == [f"norm{i}.{p}" for i in (1, 2, 3) for p in ("bias", "weight")]
    assert report.mismatched_keys == [] and len(report.loaded_keys) == len(weights)


def test_load_timm_layout_checkpoint_skips_mismatched_shapes(tmp_path):
    torch.manual_seed(2)
    weights = create_timm_swin("custom", **TINY).state_dict()
    bad_key = "layers.3.blocks.1.mlp.fc1.bias"
    weights[bad_key] = torch.zeros(5)
    path = tmp_path / "swin_timm.pth"
    torch.save(weights, path)
    backbone = tiny_swin()
    before = backbone.state_dict()[bad_key].clone()
    report = load_swin_weights(backbone, str(path))
    assert report.mismatched_keys == [bad_key] and bad_key in report.missing_keys
    assert report.unexpected_keys == ["norm.bias", "norm.weight"]
    loaded = backbone.state_dict()
    torch.testing.assert_close(loaded[bad_key], before)
    for key in ("layers.1.downsample.reduction.weight", "layers.2.blocks.1.attn.relative_position_bias_table"):
        torch.testing.assert_close(loaded[key], weights[key], rtol=0, atol=0)


# ---------------------------------------------------------------------------- necks
NECK_INPUTS = [ShapeSpec(channels=48, stride=8), ShapeSpec(channels=96, stride=16), ShapeSpec(channels=192, stride=32)]


@pytest.mark.parametrize("neck_class", [FPN, ChannelMapper])
@pytest.mark.parametrize("num_extra_levels", [0, 1, 2])
def test_neck_levels_channels_and_sizes(neck_class, num_extra_levels):
    neck = neck_class(NECK_INPUTS, out_channels=32, num_extra_levels=num_extra_levels)
    strides = [8, 16, 32, 64, 128][:3 + num_extra_levels]
    assert [(s.channels, s.stride) for s in neck.output_shapes] == [(32, s) for s in strides]
    for height, width in [(256, 256), (96, 160)]:
        feats = [torch.randn(2, s.channels, height // s.stride, width // s.stride) for s in NECK_INPUTS]
        outs = neck(feats)
        assert [tuple(o.shape) for o in outs] == [
            (2, 32, math.ceil(height / s), math.ceil(width / s)) for s in strides]


def test_only_fpn_passes_coarse_information_down():
    torch.manual_seed(0)
    feats = [torch.randn(1, s.channels, 96 // s.stride, 160 // s.stride) for s in NECK_INPUTS]
    bumped = [f.clone() for f in feats]
    bumped[-1] += 1.0
    for neck_class, expect_change in ((FPN, True), (ChannelMapper, False)):
        neck = neck_class(NECK_INPUTS, out_channels=32).eval()
        changed = not torch.allclose(neck(feats)[0], neck(bumped)[0])
        assert changed is expect_change, neck_class.__name__


def test_neck_convs_have_no_bias_under_group_norm():
    for neck in (FPN(NECK_INPUTS, out_channels=32), ChannelMapper(NECK_INPUTS, out_channels=32),
                 ChannelMapper(NECK_INPUTS, out_channels=32, norm="")):
        for conv in [m for m in neck.modules() if isinstance(m, torch.nn.Conv2d)]:
            has_norm = isinstance(conv.norm, torch.nn.GroupNorm)
            assert (conv.bias is None) is has_norm
            assert not has_norm or conv.norm.num_groups == 32


def test_build_from_config_backbone_and_both_necks():
    cfg = tiny_cfg()
    cfg.MODEL.SDCONET.SWIN.FREEZE_AT = 2
    cfg.MODEL.SDCONET.SWIN.DROP_PATH_RATE = 0.2
    backbone = build_backbone(cfg)
    assert isinstance(backbone, TimmSwinBackbone)
    assert not any(p.requires_grad for p in backbone.layers[0].parameters())
    assert all(p.requires_grad for p in backbone.layers[1].parameters())
    assert backbone.layers[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    shapes = backbone.output_shape()
    feats = backbone(torch.randn(1, 3, 96, 160))
    for name, neck_class in (("FPN", FPN), ("ChannelMapper", ChannelMapper)):
        cfg.MODEL.SDCONET.NECK.NAME = name
        neck = build_neck(cfg, [shapes[f] for f in cfg.MODEL.SDCONET.SWIN.OUT_FEATURES])
        assert type(neck) is neck_class
        assert type(build_neck(cfg, shapes)) is neck_class
        levels = neck([feats[f] for f in cfg.MODEL.SDCONET.SWIN.OUT_FEATURES])
        assert [tuple(x.shape) for x in levels] == [(1, 32, 12, 20), (1, 32, 6, 10), (1, 32, 3, 5), (1, 32, 2, 3)]
    cfg.MODEL.SDCONET.NECK.NAME = "PAFPN"
    with pytest.raises(ValueError, match="NECK.NAME"):
        build_neck(cfg, shapes)


def test_swin_tiny_default_config_at_256():
    """The real Swin-T (random weights), default ChannelMapper: shapes of docs/method.md "Shared Swin encoder"."""
    cfg = get_cfg()
    add_sdconet_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_timm_swin_backbone"
    cfg.MODEL.SDCONET.SWIN.PRETRAINED = "none"  # a named Swin needs this to start from random weights
    cfg.MODEL.SDCONET.NECK.NAME = "ChannelMapper"
    backbone = build_backbone(cfg).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 256, 256))
        levels = build_neck(cfg, backbone.output_shape())([feats[f] for f in ("res3", "res4", "res5")])
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "patch_embed": (96, 64, 64), "stage1_raw": (96, 64, 64),
        "res3": (192, 32, 32), "res4": (384, 16, 16), "res5": (768, 8, 8)}
    assert [tuple(x.shape[1:]) for x in levels] == [(256, 32, 32), (256, 16, 16), (256, 8, 8), (256, 4, 4)]
    assert sum(x.shape[-2] * x.shape[-1] for x in levels) == 1360
