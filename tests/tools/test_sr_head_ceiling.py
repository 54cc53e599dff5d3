"""tools/sr_head_ceiling.py: the least-squares bound of the release SR head, and its report."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from common import load_tool
from sdconet import get_sdconet_cfg

tool = load_tool("sr_head_ceiling")


def test_least_squares_recovers_an_exactly_representable_image():
    """An HR image that *is* a bilinear upsampling of a coarse one is reached to rounding error."""
    torch.manual_seed(0)
    coarse = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 255
    hr = tool.bilinear_to(coarse, (32, 32))
    fitted = tool.least_squares_coarse(hr, 4, steps=200)
    assert (tool.bilinear_to(fitted, (32, 32)) - hr).abs().max() < 1e-3
    # and it beats the plain area-downsample start, which blurs twice
    area = tool.bilinear_to(F.interpolate(hr, scale_factor=0.25, mode="area"), (32, 32))
    assert (area - hr).abs().max() > 1.0


def test_report_on_the_synthetic_test_tiles(synthetic_root, capsys):
    result = tool.main(["--dataset", "synthetic_rs_test", "--num", "4", "--steps", "30"])
    out = capsys.readouterr().out
    assert "release grid HR/4" in out and "release head ceiling" in out
    # least squares can only improve on its area-downsampled start; bicubic from x2 LR is far better
    assert result["PSNR_ceiling"] >= result["PSNR_area_bilinear"] - 1e-6
    assert result["PSNR_bicubic"] > result["PSNR_ceiling"] + 3
    assert 0 < result["SSIM_ceiling"] <= 1


def test_tiles_must_fit_the_release_grid(synthetic_root, tmp_path):
    records = [{"file_name": str(tmp_path / "odd.png")}]
    cv2.imwrite(records[0]["file_name"], np.zeros((30, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="30x30 is not a multiple of the release head's grid factor 4"):
        tool.measure(records, get_sdconet_cfg(""), steps=1)
