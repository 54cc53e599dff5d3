"""tools/visualize.py: each subcommand writes PNGs with the documented layout, from tiny random models."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from common import REPO, load_tool
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from sdconet import get_sdconet_cfg
from sdconet.evaluation.sr_quality import psnr_y

DINO = str(REPO / "configs" / "quick_schedules" / "dino_tiny_synthetic.yaml")
SDCONET = str(REPO / "configs" / "quick_schedules" / "sdconet_tiny_synthetic.yaml")
SIZE = 256  # synthetic tiles are 256 x 256


vis = load_tool("visualize")
T = vis.TITLE_HEIGHT


def run(command, config, out, *extra):
    written = vis.main([command, "--config-file", config, "--num", "2", "--out", str(out), "--device", "cpu", *extra])
    assert len(written) == 2 and all(Path(p).parent == Path(out) and Path(p).stat().st_size > 0 for p in written)
    return [cv2.imread(p) for p in written]


def source_images():
    return [cv2.imread(r["file_name"]) for r in DatasetCatalog.get("synthetic_rs_test")[:2]]


def save_random_model(config, folder, name, seed):
    torch.manual_seed(seed)
    DetectionCheckpointer(build_model(get_sdconet_cfg(config)), save_dir=str(folder)).save(name)
    return str(folder / f"{name}.pth")


def constant_2x2_fraction(image):
    """Share of aligned 2x2 blocks whose four pixels are equal (1 for a nearest x2 enlargement)."""
    blocks = image.astype(int).reshape(image.shape[0] // 2, 2, image.shape[1] // 2, 2, 3)
    return float((blocks == blocks[:, :1, :, :1]).all(axis=(1, 3, 4)).mean())


def test_predictions_lr_enlarged_beside_hr(synthetic_root, tmp_path, capsys):
    pictures = run("predictions", DINO, tmp_path / "a", "--score", "0")
    printed = capsys.readouterr().out
    assert str(tmp_path / "a" / "test_00000_predictions.png") in printed
    for picture in pictures:
        assert picture.shape == (T + SIZE, 2 * SIZE, 3)
    lr_panel, hr_panel = pictures[0][T:, :SIZE], pictures[0][T:, SIZE:]
    no_preds = run("predictions", DINO, tmp_path / "b", "--score", "1.01")[0]
    # Without predictions only the few GT boxes cover the LR panel: it is the x2 nearest enlargement.
    assert constant_2x2_fraction(no_preds[T:, :SIZE]) > 0.8
    assert constant_2x2_fraction(no_preds[T:, SIZE:]) < 0.3  # HR keeps its pixel-level noise
    assert np.abs(no_preds[T:, :SIZE].astype(int) - lr_panel.astype(int)).sum() > 0  # score 0: boxes drawn
    assert np.abs(no_preds[T:, SIZE:].astype(int) - hr_panel.astype(int)).sum() > 0


def test_features_one_row_per_checkpoint(synthetic_root, tmp_path):
    dino_a = save_random_model(DINO, tmp_path, "dino_a", seed=0)
    dino_b = save_random_model(SDCONET, tmp_path, "sdconet_b", seed=1)
    row = 2 * T + SIZE  # row label bar + panel title bar + panel
    single = run("features", DINO, tmp_path / "one", "--weights", dino_a)
    assert all(p.shape == (row, 4 * SIZE, 3) for p in single)

    same = run("features", DINO, tmp_path / "same", "--weights", dino_a, "--weights2", dino_a)[0]
    assert same.shape == (2 * row, 4 * SIZE, 3)
    assert np.array_equal(same[:row], same[row:])  # both rows load the same weights
    assert np.array_equal(same[:row], single[0])

    pair = run("features", DINO, tmp_path / "pair", "--weights", dino_a, "--label", "DINO",
               "--weights2", dino_b, "--config-file2", SDCONET, "--label2", "SDCoNet")
    for picture in pair:
        assert picture.shape == (2 * row, 4 * SIZE, 3)
    assert np.array_equal(pair[0][T:row], single[0][T:])  # first row: same checkpoint, other label
    assert not np.array_equal(pair[0][row + T:], pair[0][T:row])


def test_feature_heatmap_peaks_where_activation_is_strongest():
    feature = torch.zeros(8, 5, 6)
    feature[:, 3, 1] = -4.0  # strong negative activations count by magnitude
    feature[:2, 0, 0] = 1.0
    for reduce in ("mean_abs", "l2"):
        heat = vis.feature_heatmap(feature, reduce)
        assert heat.shape == (5, 6) and heat.min() == 0.0 and heat.max() == 1.0
        assert np.unravel_index(heat.argmax(), heat.shape) == (3, 1)
        assert 0 < heat[0, 0] < 1
    assert not vis.feature_heatmap(torch.ones(4, 3, 3)).any()  # flat map: zeros, no division by zero


def test_saliency_panels_per_level(synthetic_root, tmp_path):
    cfg = get_sdconet_cfg(SDCONET)
    levels = len(cfg.MODEL.SDCONET.SWIN.OUT_FEATURES) + cfg.MODEL.SDCONET.NECK.NUM_EXTRA_LEVELS
    pictures = run("saliency", SDCONET, tmp_path)
    for picture, source in zip(pictures, source_images()):
        assert picture.shape == (T + SIZE, (1 + levels) * SIZE, 3)
        assert np.array_equal(picture[T:, :SIZE], source)  # first panel: the image itself
        assert not np.array_equal(picture[T:, SIZE: 2 * SIZE], source)


def test_sr_panels_and_psnr(synthetic_root, tmp_path, capsys):
    crop = 48
    pictures = run("sr", SDCONET, tmp_path, "--crop-size", str(crop), "--residual-gain", "8")
    printed = capsys.readouterr().out
    assert printed.count("PSNR SR") == 2
    records = DatasetCatalog.get("synthetic_rs_test")[:2]
    for picture, source, record in zip(pictures, source_images(), records):
        # [LR | bicubic | SR | residual | HR] over their W x W crops
        assert picture.shape == (2 * T + 2 * SIZE, 5 * SIZE, 3)
        left, top, side = vis.zoom_window(vis.gt_boxes(record), source.shape[:2], crop)
        hr_crop = cv2.resize(source[top: top + side, left: left + side], (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(picture[2 * T + SIZE:, 4 * SIZE:], hr_crop)
        inside = (slice(top + 2, top + side - 2), slice(left + 2, left + side - 2))  # away from the crop frame
        lr, bicubic, sr = (picture[T: T + SIZE, k * SIZE: (k + 1) * SIZE] for k in range(3))
        assert psnr_y(bicubic[inside], source[inside]) > 25  # bicubic of the x2 LR input resembles HR
        r, c = (top + 3) // 2 * 2, (left + 3) // 2 * 2  # an LR pixel inside the crop frame
        blocks = lr[r: r + 4, c: c + 4].reshape(2, 2, 2, 2, 3)
        assert (blocks == blocks[:, :1, :, :1]).all()  # x2 nearest: every LR pixel is a 2x2 block
        residual = picture[T: T + SIZE, 3 * SIZE: 4 * SIZE][inside].astype(int)
        expected = np.clip(128 + 8 * (sr[inside].astype(int) - bicubic[inside].astype(int)), 0, 255)
        assert np.array_equal(residual, expected)


def test_amplified_residual_is_grey_where_sr_adds_nothing():
    bicubic = np.full((4, 4, 3), 100, np.uint8)
    sr = bicubic.copy()
    sr[0, 0] = (103, 90, 200)
    out = vis.amplified_residual(sr, bicubic, 10.0)
    assert out[1:, 1:].tolist() == np.full((3, 3, 3), 128).tolist()
    assert out[0, 0].tolist() == [158, 28, 255]  # 128 + 10 * (3, -10, 100), clipped


def test_zoom_window_centres_on_largest_box_inside_the_image():
    boxes = np.array([[10, 10, 14, 14], [100, 40, 140, 60]], dtype=float)
    assert vis.zoom_window(boxes, (256, 256), 64) == (88, 18, 64)  # centre (120, 50)
    assert vis.zoom_window(np.array([[240, 0, 256, 8]], float), (256, 256), 64) == (192, 0, 64)  # clamped
    assert vis.zoom_window(np.zeros((0, 4)), (100, 200), 300) == (50, 0, 100)  # no box: centre, side <= image


@pytest.mark.parametrize("command, option", [("saliency", "SALIENCY.ENABLED"), ("sr", "SR.ENABLED")])
def test_missing_branch_is_a_clear_error(synthetic_root, tmp_path, command, option):
    with pytest.raises(vis.ConfigError, match=option):
        vis.main([command, "--config-file", DINO, "--num", "1", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert not (tmp_path / "out").exists()  # failed before drawing anything
