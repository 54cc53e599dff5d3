"""tools/train_peer.py: the peer sees exactly our model's LR input, and its LR boxes come back onto
the HR tile in our evaluator (checked with common.RememberingPeer, which remembers its training set)."""
import json

import numpy as np
import pytest
import torch

from common import TINY, load_cfg, load_tool
from sdconet.modeling.degradation import build_degradation

train_peer = load_tool("train_peer")


def test_lr_image_is_the_models_input_rounded():
    """The peer's LR image equals the model's in-model degradation (on normalised pixels) to rounding."""
    cfg = load_cfg(TINY)
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    peer_lr = train_peer.lr_image(hr, train_peer.degradation_of(cfg)).astype(np.float32)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    # the model reads BGR when INPUT.FORMAT is BGR: compare channel by channel in the model's order
    hr_model = torch.from_numpy(hr).permute(2, 0, 1).float()
    if cfg.INPUT.FORMAT == "BGR":
        hr_model = hr_model.flip(0)
    model_lr = build_degradation(cfg)(((hr_model - mean) / std)[None])[0] * std + mean
    if cfg.INPUT.FORMAT == "BGR":
        model_lr = model_lr.flip(0)
    assert peer_lr.shape == (32, 24, 3)
    expected = model_lr.permute(1, 2, 0).clamp(0, 255).numpy()
    assert np.abs(peer_lr - expected).max() <= 0.5 + 1e-3
    assert np.abs(peer_lr - hr[::2, ::2]).max() > 1  # it did interpolate, not subsample


def test_lr_targets_scale_clip_and_drop_crowd():
    record = {"height": 64, "width": 64, "annotations": [
        {"bbox": [10, 20, 8, 6], "bbox_mode": 1, "category_id": 2},          # XYWH_ABS
        {"bbox": [60, 0, 70, 4], "bbox_mode": 0, "category_id": 1},          # XYXY, sticks out right
        {"bbox": [0, 0, 10, 10], "bbox_mode": 0, "category_id": 0, "iscrowd": 1},
    ]}
    target = train_peer.lr_targets(record, 2)
    np.testing.assert_allclose(target["boxes"], [[5, 10, 9, 13], [30, 0, 32, 2]])
    assert target["classes"].tolist() == [2, 1]
    assert target["boxes"].dtype == np.float32 and target["classes"].dtype == np.int64


def test_remembering_peer_scores_100_on_its_training_set(synthetic_root, tmp_path):
    out = tmp_path / "peer"
    results = train_peer.main([
        "--peer", "common:RememberingPeer", "--config-file", TINY, "--seed", "0", "--budget-seconds", "1",
        "--output-dir", str(out), "--threads", "1", "DATASETS.TEST", "('synthetic_rs_train',)"])
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    saved = json.loads((out / "final_metrics.json").read_text())
    assert saved["bbox"]["AP50"] == pytest.approx(100.0)
    assert saved["peer"]["iterations"] == 8
    assert json.loads((out / "metrics.json").read_text().splitlines()[-1])["train_seconds"] == 0.0


def test_a_peer_that_sees_other_images_scores_zero(synthetic_root, tmp_path):
    """The same peer scored on the test split knows none of its images and answers with boxes of other
    tiles: AP near 0, so the 100 above is not the evaluator's doing."""
    results = train_peer.main([
        "--peer", "common:RememberingPeer", "--config-file", TINY, "--budget-seconds", "1",
        "--output-dir", str(tmp_path / "peer"), "--threads", "1"])
    assert results["bbox"]["AP"] < 10


def test_unknown_peer_names_the_known_ones():
    with pytest.raises(ValueError, match="yolo11n"):
        train_peer.load_peer("retinanet")
