"""SR decoder: stage shapes at Swin-T widths, the three heads, odd sizes, config,
the residual head starting at bicubic, learning."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import get_cfg
from sdconet.config import add_sdconet_config, check_sdconet_config
from sdconet.modeling.backbone import TimmSwinBackbone
from sdconet.modeling.degradation import Degradation
from sdconet.modeling.sr_decoder import SRDecoder, build_sr_decoder
from torch.overrides import TorchFunctionMode

TINY_SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
TINY_SR = dict(depths=(1, 1, 1, 1), num_heads=(), drop_path_rate=0.0)


class InterpolateCalls(TorchFunctionMode):
    """Records the resampling modes of every F.interpolate call made inside the context."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.interpolate:
            self.modes.append(kwargs.get("mode", "nearest"))
        return func(*args, **kwargs)


LR_256 = torch.zeros(1, 3, 256, 256)  # the release heads never read the LR pixels


@pytest.fixture(scope="module")
def swin_t_lr():
    torch.manual_seed(0)
    return torch.randn(1, 3, 256, 256)


@pytest.fixture(scope="module")
def swin_t_features(swin_t_lr):
    """Real Swin-T (random weights) features of a 256x256 LR batch."""
    torch.manual_seed(0)
    backbone = TimmSwinBackbone("swin_tiny_patch4_window7_224").eval()
    with torch.no_grad():
        return backbone(swin_t_lr)


def test_swin_t_stage_shapes_x2_bilinear(swin_t_features):
    """1536x4x4 -> 768x8x8 -> 384x16x16 -> 192x32x32 -> 96x64x64 -> 3x128x128 -> 3x512x512."""
    torch.manual_seed(0)
    decoder = SRDecoder(96, head="x2_bilinear").eval()
    seen = {}
    decoder.bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("bottleneck", o))
    for index, stage in enumerate(decoder.stages):  # stages work in NHWC
        stage.register_forward_hook(lambda m, i, o, k=index: seen.__setitem__(k, o.permute(0, 3, 1, 2)))
    decoder.head.register_forward_hook(lambda m, i, o: seen.__setitem__("head", o))
    with torch.no_grad(), InterpolateCalls() as calls:
        sr = decoder(swin_t_features, LR_256, (512, 512))
    shapes = [tuple(seen[k].shape[1:]) for k in ("bottleneck", 0, 1, 2, 3, "head")]
    assert shapes == [(1536, 4, 4), (768, 8, 8), (384, 16, 16), (192, 32, 32), (96, 64, 64), (3, 128, 128)]
    assert sr.shape == (1, 3, 512, 512)
    # the last x4 is exactly a bilinear resize of the learned LR/2 output, and the only resize
    assert calls.modes == ["bilinear"]
    expected = F.interpolate(seen["head"], size=(512, 512), mode="bilinear", align_corners=False)
    torch.testing.assert_close(sr, expected)
    assert sum(isinstance(m, nn.PixelShuffle) for m in decoder.modules()) == 1
    # bug 4 fixed: the head reads the 96-channel decoder output
    assert decoder.head[0].in_channels == 96
    # drop path grows linearly from 0 (first block) to 0.1 (last of the 12 blocks)
    blocks = [b for s in decoder.stages for b in s.blocks]
    assert len(blocks) == 12 and isinstance(blocks[0].drop_path1, nn.Identity)
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert [b.shift_size for b in decoder.stages[1].blocks[:2]] == [(0, 0), (4, 4)]


@pytest.mark.parametrize("scale, pixel_shuffles", [(2, 3), (4, 4)])
def test_full_head_learns_up_to_hr(swin_t_features, scale, pixel_shuffles):
    """head="full": tokens at LR/4 reach HR = LR * scale through PixelShuffle(2) stages only."""
    torch.manual_seed(0)
    decoder = SRDecoder(96, head="full", scale=scale).eval()
    assert sum(isinstance(m, nn.PixelShuffle) for m in decoder.modules()) == pixel_shuffles
    seen = {}
    decoder.head.register_forward_hook(lambda m, i, o: seen.__setitem__("head", o))
    hr_size = (256 * scale, 256 * scale)
    with torch.no_grad(), InterpolateCalls() as calls:
        sr = decoder(swin_t_features, LR_256, hr_size)
    assert sr.shape == (1, 3, *hr_size)
    assert calls.modes == []  # nothing resampled
    assert torch.equal(sr, seen["head"])


def test_residual_head_is_bicubic_plus_a_full_resolution_residual(swin_t_lr, swin_t_features):
    """head="residual" at Swin-T widths: tokens 96x64x64 -> PixelShuffle(4) -> 32x256x256 (+ a conv
    of the LR pixels) -> conv -> PixelShuffle(2) -> 3x512x512 residual on bicubic, zero at init."""
    torch.manual_seed(0)
    decoder = SRDecoder(96, head="residual", scale=2).eval()
    head = decoder.head
    assert head.from_tokens[0].in_channels == 96 and head.from_pixels.in_channels == 3
    assert [m.upscale_factor for m in decoder.modules() if isinstance(m, nn.PixelShuffle)] == [4, 2]
    seen = {}
    head.from_tokens.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o))
    head.to_residual.register_forward_hook(lambda m, i, o: seen.__setitem__("residual", o))
    with torch.no_grad(), InterpolateCalls() as calls:
        sr = decoder(swin_t_features, swin_t_lr, (512, 512))
    assert tuple(seen["tokens"].shape) == (1, 32, 256, 256) and tuple(seen["residual"].shape) == (1, 3, 512, 512)
    assert calls.modes == ["bicubic"]  # the skip is the only resize; the residual is learned
    bicubic = F.interpolate(swin_t_lr, size=(512, 512), mode="bicubic", align_corners=False)
    assert torch.equal(sr, bicubic + seen["residual"]) and not seen["residual"].any()

    with torch.no_grad():  # once the last layer moves, the residual depends on the LR pixels too
        head.to_residual[0].weight.normal_(std=0.01)
        changed = swin_t_lr.clone()
        changed[..., 100:110, 100:110] += 1.0
        a = decoder(swin_t_features, swin_t_lr, (512, 512)) - bicubic
        b = decoder(swin_t_features, changed, (512, 512)) - F.interpolate(changed, size=(512, 512), mode="bicubic")
    assert (a - b)[..., 200:220, 200:220].abs().max() > 1e-4
    assert torch.equal((a - b)[..., :150, :], torch.zeros_like(a[..., :150, :]))  # 3x3 convs: local


@pytest.mark.parametrize("head", ["residual", "x2_bilinear", "full"])
@pytest.mark.parametrize("lr_size", [(96, 160), (100, 60), (50, 30)])
def test_non_square_and_odd_sizes(head, lr_size):
    """Odd token grids (e.g. 25x15 -> 13x8 -> 7x4 -> 4x2) still give exactly the HR size."""
    torch.manual_seed(0)
    backbone = TimmSwinBackbone("custom", **TINY_SWIN).eval()
    decoder = SRDecoder(32, head=head, **TINY_SR).eval()
    hr_size = (2 * lr_size[0], 2 * lr_size[1])
    lr = torch.randn(2, 3, *lr_size)
    with torch.no_grad():
        sr = decoder(backbone(lr), lr, hr_size)
    assert sr.shape == (2, 3, *hr_size)
    assert torch.isfinite(sr).all()


def test_heads_are_validated_and_derived():
    with pytest.raises(ValueError, match=r"num_heads=\(6, 12, 6, 3\) needs one value per stage dividing"):
        SRDecoder(32, num_heads=(6, 12, 6, 3))  # 6 does not divide 256
    assert SRDecoder(32, **TINY_SR).num_heads == (8, 4, 2, 1)
    with pytest.raises(ValueError, match="head must be one of .*got 'x8'"):
        SRDecoder(32, head="x8", **TINY_SR)


def test_config_keys_validation_and_from_config():
    cfg = add_sdconet_config(get_cfg())
    sr = cfg.MODEL.SDCONET.SR
    assert (sr.ENABLED, sr.HEAD, tuple(sr.DEPTHS)) == (False, "residual", (2, 6, 2, 2))
    assert tuple(sr.NUM_HEADS) == (6, 12, 6, 3)
    assert (sr.RESIDUAL_FEATURES, sr.RESIDUAL_CONVS) == (32, 1)
    assert (sr.WINDOW_SIZE, sr.MLP_RATIO, sr.DROP_PATH_RATE, sr.LOSS_WEIGHT) == (8, 2.0, 0.1, 5.0)
    check_sdconet_config(cfg)
    with pytest.raises(ValueError, match="timm Swin"):
        build_sr_decoder(cfg)  # the timm name fixes embed_dim: must be passed
    assert build_sr_decoder(cfg, embed_dim=96).widths == (768, 384, 192, 96)

    cfg.MODEL.SDCONET.SWIN.NAME, cfg.MODEL.SDCONET.SWIN.EMBED_DIM = "custom", 32
    sr.HEAD, sr.NUM_HEADS, sr.DEPTHS = "full", (), (1, 1, 1, 1)
    cfg.MODEL.SDCONET.DEGRADE.SCALE = 4
    check_sdconet_config(cfg)
    decoder = build_sr_decoder(cfg)
    assert (decoder.widths, decoder.head_mode, decoder.learned_factor) == ((256, 128, 64, 32), "full", 16)

    sr.HEAD, sr.RESIDUAL_FEATURES, sr.RESIDUAL_CONVS = "residual", 8, 3
    decoder = build_sr_decoder(cfg)
    assert decoder.head.from_pixels.out_channels == 8
    assert sum(isinstance(m, nn.Conv2d) for m in decoder.head.body) == 3
    assert decoder.head.to_residual[1].upscale_factor == 4

    sr.HEAD = "bicubic"
    with pytest.raises(ValueError, match="MODEL.SDCONET.SR.HEAD"):
        check_sdconet_config(cfg)
    sr.HEAD, sr.RESIDUAL_FEATURES = "residual", 0
    with pytest.raises(ValueError, match="MODEL.SDCONET.SR.RESIDUAL_FEATURES=0: must be >= 1"):
        check_sdconet_config(cfg)


def test_loss_is_l1_over_valid_pixels():
    torch.manual_seed(0)
    sr, hr = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert SRDecoder.loss(sr, hr) == pytest.approx(F.l1_loss(sr, hr).item())
    valid = torch.zeros(2, 8, 8, dtype=torch.bool)
    valid[:, :, :5] = True  # right columns are batch padding
    masked = SRDecoder.loss(sr, hr, valid)
    assert masked == pytest.approx(F.l1_loss(sr[..., :5], hr[..., :5]).item())
    sr_bad_padding = sr.clone()
    sr_bad_padding[..., 5:] += 100.0
    assert SRDecoder.loss(sr_bad_padding, hr, valid) == pytest.approx(masked.item())


@pytest.mark.parametrize("head", ["residual", "x2_bilinear"])
def test_sr_loss_falls_when_overfitting_one_image(head):
    """Tiny backbone + decoder, 40 Adam steps on one 64x64 image (LR = bicubic x2).

    x2_bilinear starts from noise: measured final/initial ~0.18 (seeds 0-2), 0.5 leaves a margin.
    residual starts at bicubic's error and must go below it (it cannot rebuild the image from
    nothing, so a ratio would not mean the same)."""
    torch.manual_seed(0)
    backbone = TimmSwinBackbone("custom", **TINY_SWIN)
    decoder = SRDecoder(32, head=head, **TINY_SR)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    hr = torch.stack([torch.sin(6 * xx) + yy, 1.5 * torch.cos(5 * xx * yy),
                      ((xx ** 2 + yy ** 2) < 0.3).float() * 2 - 1]).unsqueeze(0)
    lr = Degradation(scale=2, mode="bicubic")(hr)
    assert lr.shape == (1, 3, 32, 32)
    bicubic_loss = decoder.loss(F.interpolate(lr, size=(64, 64), mode="bicubic", align_corners=False), hr).item()
    optimizer = torch.optim.Adam([*backbone.parameters(), *decoder.parameters()], lr=1e-3)
    losses = []
    for step in range(40):
        loss = decoder.loss(decoder(backbone(lr), lr, hr.shape[-2:]), hr)
        optimizer.zero_grad()
        loss.backward()
        if step == 1:  # SR gradients reach the shared encoder, down to the patch embedding
            # (step 1: the residual head's zero last layer passes no gradient back at step 0)
            assert backbone.patch_embed.proj.weight.grad.abs().sum() > 0
            assert backbone.layers[3].blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    if head == "residual":
        assert losses[0] == pytest.approx(bicubic_loss, rel=1e-5)
        assert losses[-1] < 0.9 * bicubic_loss, (bicubic_loss, losses)  # measured ~0.75 (seeds 0-2)
    else:
        assert losses[-1] < 0.5 * losses[0], losses
