"""Y-channel PSNR/SSIM against skimage, and SRQualityEvaluator's averages on hand-made pairs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sdconet.evaluation.sr_quality import SRQualityEvaluator, psnr_y, ssim_y, to_y_channel
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def skimage_y(rgb_hwc_uint8):
    return rgb2ycbcr(rgb_hwc_uint8)[..., 0]  # matlab convention: 16..235 for uint8 input


def skimage_ssim(y_a, y_b):
    return structural_similarity(y_a, y_b, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)


def random_pair(seed, shape=(40, 48, 3), noise=12.0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = np.clip(a + rng.normal(0, noise, shape), 0, 255).round().astype(np.uint8)
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_skimage_on_random_images(seed):
    rgb_a, rgb_b = random_pair(seed, noise=4.0 + 10 * seed)
    y_a, y_b = skimage_y(rgb_a), skimage_y(rgb_b)
    assert np.allclose(to_y_channel(rgb_a, channel_order="RGB").numpy(), y_a, atol=1e-9)
    assert psnr_y(rgb_a, rgb_b, channel_order="RGB") == pytest.approx(
        peak_signal_noise_ratio(y_a, y_b, data_range=255), abs=1e-4)
    assert ssim_y(rgb_a, rgb_b, channel_order="RGB") == pytest.approx(skimage_ssim(y_a, y_b), abs=1e-4)
    # border crop = measuring the cropped images
    assert ssim_y(rgb_a, rgb_b, channel_order="RGB", crop_border=3) == pytest.approx(
        skimage_ssim(y_a[3:-3, 3:-3], y_b[3:-3, 3:-3]), abs=1e-4)
    assert psnr_y(rgb_a, rgb_b, channel_order="RGB", crop_border=3) == pytest.approx(
        peak_signal_noise_ratio(y_a[3:-3, 3:-3], y_b[3:-3, 3:-3], data_range=255), abs=1e-4)


def test_layout_and_channel_order_agree():
    rgb_a, rgb_b = random_pair(5)
    bgr_chw_a = torch.from_numpy(rgb_a[..., ::-1].copy()).permute(2, 0, 1)
    bgr_chw_b = torch.from_numpy(rgb_b[..., ::-1].copy()).permute(2, 0, 1)
    assert psnr_y(bgr_chw_a, bgr_chw_b) == pytest.approx(psnr_y(rgb_a, rgb_b, channel_order="RGB"), abs=1e-9)
    assert ssim_y(bgr_chw_a, bgr_chw_b) == pytest.approx(ssim_y(rgb_a, rgb_b, channel_order="RGB"), abs=1e-9)
    # reading RGB as BGR swaps the R and B weights, which changes the result
    assert psnr_y(rgb_a, rgb_b, channel_order="BGR") != pytest.approx(psnr_y(rgb_a, rgb_b, channel_order="RGB"))


def test_identical_images():
    rgb, _ = random_pair(3)
    assert psnr_y(rgb, rgb) == math.inf
    assert ssim_y(rgb, rgb) == pytest.approx(1.0, abs=1e-12)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        psnr_y(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError):
        ssim_y(np.zeros((3, 8, 8)), np.zeros((3, 8, 8)))  # smaller than the 11x11 window


def test_evaluator_averages_two_pairs():
    h, w = 32, 32
    # Pair A: constant HR; its exact 2x bicubic downsampling is the same constant, so bicubic
    # upsampling gives the HR image back (infinite PSNR, SSIM 1). The SR image differs by d
    # in every channel at one pixel, i.e. by d * (65.481 + 128.553 + 24.966) / 255 in Y.
    hr_a = torch.full((3, h, w), 100, dtype=torch.uint8)
    lr_a = F.interpolate(hr_a[None].double(), scale_factor=0.5, mode="bicubic", align_corners=False)[0]
    d = 20.0
    sr_a = hr_a.double().clone()
    sr_a[:, 7, 9] += d
    mse_a = (d * 219.0 / 255.0) ** 2 / (h * w)
    psnr_sr_a = 10 * math.log10(255.0**2 / mse_a)
    rgb_hr_a = hr_a.permute(1, 2, 0).numpy()[..., ::-1]
    rgb_sr_a = sr_a.permute(1, 2, 0).numpy()[..., ::-1].astype(np.uint8)
    ssim_sr_a = skimage_ssim(skimage_y(rgb_sr_a), skimage_y(rgb_hr_a))

    # Pair B: random HR reproduced exactly by the SR branch; random LR, so bicubic is off.
    rng = np.random.default_rng(0)
    hr_b = torch.from_numpy(rng.integers(0, 256, (3, h, w)).astype(np.uint8))
    sr_b = hr_b.double() + torch.from_numpy(rng.uniform(-0.4, 0.4, (3, h, w)))  # rounds back to HR
    lr_b = torch.from_numpy(rng.uniform(-20, 275, (3, h // 2, w // 2)))  # out-of-range on purpose
    bicubic_b = F.interpolate(lr_b[None], size=(h, w), mode="bicubic", align_corners=False)[0]
    bicubic_b = bicubic_b.clamp(0, 255).round().numpy().astype(np.uint8)
    y_bicubic_b = skimage_y(bicubic_b.transpose(1, 2, 0)[..., ::-1])
    y_hr_b = skimage_y(hr_b.permute(1, 2, 0).numpy()[..., ::-1])

    evaluator = SRQualityEvaluator()
    evaluator.reset()
    evaluator.process([{"image": hr_a}, {"image": hr_b}],
                      [{"sr": sr_a.float(), "lr": lr_a.float()}, {"sr": sr_b.float(), "lr": lr_b.float()}])
    res = evaluator.evaluate()["sr_quality"]

    assert res["PSNR_SR"] == pytest.approx(psnr_sr_a, abs=1e-4)  # pair B is infinite, left out
    assert res["SSIM_SR"] == pytest.approx((ssim_sr_a + 1.0) / 2, abs=1e-4)
    assert res["PSNR_bicubic"] == pytest.approx(peak_signal_noise_ratio(y_hr_b, y_bicubic_b, data_range=255), abs=1e-4)
    assert res["SSIM_bicubic"] == pytest.approx((1.0 + skimage_ssim(y_bicubic_b, y_hr_b)) / 2, abs=1e-4)
    assert res["PSNR_gain"] == pytest.approx(res["PSNR_SR"] - res["PSNR_bicubic"])
    assert res["SSIM_gain"] == pytest.approx(res["SSIM_SR"] - res["SSIM_bicubic"])


def test_evaluator_requires_sr_output():
    evaluator = SRQualityEvaluator()
    evaluator.reset()
    hr = torch.zeros((3, 16, 16), dtype=torch.uint8)
    with pytest.raises(KeyError, match="SR branch"):
        evaluator.process([{"image": hr}], [{"instances": None}])
    with pytest.raises(ValueError, match="shape"):
        evaluator.process([{"image": hr}], [{"sr": torch.zeros(3, 8, 8), "lr": torch.zeros(3, 4, 4)}])
