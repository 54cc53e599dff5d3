"""tools/visualize_data.py draws GT on HR and on the degraded LR image of a registered dataset."""
import os

import cv2
import numpy as np
import sdconet
from common import load_tool
from sdconet.data.datasets import datasets_root
from sdconet.data.synthetic import generate_split


def test_writes_hr_and_lr_pictures(tmp_path):
    root = str(tmp_path / "data")
    generate_split(root, "train", 3, seed=1)
    sdconet.register_sdconet_datasets(root)
    try:
        tool = load_tool("visualize_data")
        out = str(tmp_path / "vis")
        written = tool.main(["--dataset", "synthetic_rs_train", "--num", "2", "--out", out, "--lr-zoom", "1"])
    finally:
        sdconet.register_sdconet_datasets(datasets_root())
    assert len(written) == 4 and sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in written)
    hr = cv2.imread(os.path.join(out, "train_00000_hr.png"))
    lr = cv2.imread(os.path.join(out, "train_00000_lr.png"))
    assert hr.shape == (256, 256, 3) and lr.shape == (128, 128, 3)  # x2 degradation, drawn at its own size
    src = cv2.imread(os.path.join(root, "Synthetic_RS/train/images/train_00000.png"))
    assert np.abs(hr.astype(int) - src.astype(int)).sum() > 0  # boxes were drawn


def test_degrade_image_matches_model_degradation():
    import torch
    import torch.nn.functional as F
    from sdconet.modeling.degradation import Degradation

    tool = load_tool("visualize_data")
    img = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    mean, std = [100.0, 110.0, 120.0], [50.0, 60.0, 70.0]
    lr = tool.degrade_image(img, Degradation(scale=2), mean, std)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() - m) / s
    ref = (F.interpolate(x, size=(16, 24), mode="bicubic", align_corners=False) * s + m)[0].permute(1, 2, 0)
    assert lr.shape == (16, 24, 3)
    assert np.abs(lr.astype(float) - ref.round().clamp(0, 255).numpy()).max() <= 1
