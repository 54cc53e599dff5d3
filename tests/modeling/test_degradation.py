"""The degradation inside the model: bicubic x1/s, seeded noise in pixel units, blur."""

import pytest
import torch
import torch.nn.functional as F
from sdconet.modeling.degradation import Degradation


# ------------------------------------------------------------------ degradation
def test_degradation_scale1_is_identity_and_bicubic_matches_interpolate():
    x = torch.randn(2, 3, 16, 24)
    assert Degradation(scale=1)(x) is x
    lr = Degradation(scale=2)(x)
    assert lr.shape == (2, 3, 8, 12)
    torch.testing.assert_close(lr, F.interpolate(x, scale_factor=0.5, mode="bicubic", align_corners=False))
    assert Degradation(scale=4)(x).shape == (2, 3, 4, 6)
    with pytest.raises(ValueError, match="scale"):
        Degradation(scale=3)
    with pytest.raises(ValueError, match="multiple"):
        Degradation(scale=4)(torch.randn(1, 3, 10, 16))


def test_degradation_noise_is_seeded_and_in_pixel_units():
    x = torch.zeros(4, 3, 64, 64)
    deg = Degradation(scale=1, noise_std=(10.0, 10.0), pixel_std=(50.0, 50.0, 50.0), seed=3)
    a = deg(x)
    b = Degradation(scale=1, noise_std=(10.0, 10.0), pixel_std=(50.0, 50.0, 50.0), seed=3)(x)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, deg(x))  # the generator advances between batches
    assert abs(a.std().item() - 10.0 / 50.0) < 0.01


def test_degradation_blur_smooths():
    x = torch.zeros(1, 3, 32, 32)
    x[..., 16, 16] = 1.0
    y = Degradation(scale=1, blur_sigma=(1.5, 1.5), seed=0)(x)
    assert y[..., 16, 16].max() < 0.2 and abs(y.sum().item() - 3.0) < 1e-3  # energy spread, kept
