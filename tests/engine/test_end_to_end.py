"""End to end: empty images train, eval boxes lie in the image, the tiny detector learns, and
tools/train_net.py trains, checkpoints, resumes and evaluates."""
import glob
import json
import os

import pytest
import torch
from common import SDCONET_TINY, TINY, load_cfg, run_train_net, sample
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from sdconet.engine.trainer import Trainer


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(load_cfg(TINY))


def test_train_step_with_empty_instances(tiny_model):
    tiny_model.train()
    batch = [sample(64, 64, [], []), sample(48, 80, [], [])]
    with EventStorage():
        losses = tiny_model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total)
        tiny_model.zero_grad()
        total.backward()
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_enc", "loss_class_dn"} <= set(losses)
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_loss_keys_stable_with_and_without_objects(tiny_model):
    tiny_model.train()
    with EventStorage():
        empty = tiny_model([sample(64, 64, [], [])])
        full = tiny_model([sample(64, 64, [[4, 4, 20, 16], [30, 30, 50, 60]], [1, 3])])
    assert set(empty) == set(full)


def test_eval_boxes_inside_requested_image(tiny_model):
    tiny_model.eval()
    # The user asked for 100x150 output of a 64x96 input (e.g. the loader resized it).
    batch = [sample(64, 96, [], [], out_hw=(100, 150)), sample(62, 46, [], [])]
    with torch.no_grad():
        out = tiny_model(batch)
    for o, (h, w) in zip(out, [(100, 150), (62, 46)]):
        inst = o["instances"]
        assert inst.image_size == (h, w)
        b = inst.pred_boxes.tensor
        assert len(b) > 0
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert inst.pred_classes.max() < 4


def test_tiny_detector_overfits_eight_images(synthetic_root, tmp_path):
    """Losses, matcher and box decoding are right if the tiny model memorises 8 images."""
    cfg = load_cfg(TINY, [
        "DATASETS.TRAIN", ("synthetic_rs_train",), "DATASETS.TEST", ("synthetic_rs_train",),
        "SOLVER.MAX_ITER", 300, "SOLVER.STEPS", (240,), "SOLVER.CHECKPOINT_PERIOD", 100000,
        "DATALOADER.NUM_WORKERS", 0, "SEED", 0, "OUTPUT_DIR", str(tmp_path / "out")])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = Trainer.test(cfg, trainer.model)["bbox"]
    assert results["AP50"] >= 90.0, results


def test_train_net_trains_resumes_and_evaluates(synthetic_root, tmp_path):
    env = dict(os.environ, SDCONET_DATASETS=synthetic_root)
    out = str(tmp_path / "run")
    flags = ["--config-file", TINY]
    common = ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
              "OUTPUT_DIR", out, "SOLVER.CHECKPOINT_PERIOD", "2"]
    run_train_net(*flags, *common, "SOLVER.MAX_ITER", "2", cwd=str(tmp_path), env=env)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert glob.glob(os.path.join(out, "events.out.tfevents.*")), "no TensorBoard events written"
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"

    # --resume continues at iteration 2 up to 4 (and evaluates at the end: EVAL_PERIOD 0 -> final test).
    log = run_train_net(*flags, "--resume", *common, "SOLVER.MAX_ITER", "4", cwd=str(tmp_path), env=env)
    assert "Starting training from iteration 2" in log
    iters = [json.loads(line)["iteration"] for line in open(os.path.join(out, "metrics.json")) if '"iteration"' in line]
    assert iters == sorted(set(iters)) and max(iters) >= 3  # continued, never restarted from 0

    log = run_train_net("--config-file", TINY, "--eval-only", "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"),
                        "OUTPUT_DIR", str(tmp_path / "eval"), "DATALOADER.NUM_WORKERS", "0", cwd=str(tmp_path), env=env)
    assert "Evaluation results for bbox" in log
    assert os.path.isfile(os.path.join(tmp_path, "eval", "inference", "synthetic_rs_test", "coco_instances_results.json"))


def test_blur_and_noise_apply_at_scale_one():
    """Scale 1 with noise must still degrade the input (not be skipped as 'no down-sampling')."""
    cfg = load_cfg(TINY, ["MODEL.SDCONET.DEGRADE.SCALE", 1, "MODEL.SDCONET.DEGRADE.NOISE_STD", (20.0, 20.0)])
    model = build_model(cfg).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    batch = [sample(64, 64, [], [])]
    with torch.no_grad():
        model(batch)
        model.degrade_test = False
        model(batch)
    assert seen[0].shape == seen[1].shape == (1, 3, 64, 64)
    assert (seen[0] - seen[1]).abs().mean() > 0.1  # noise of 20/~57 in normalised units was added


def test_eval_reports_tiny_bands_and_sr_quality(synthetic_root, tmp_path):
    cfg = load_cfg(SDCONET_TINY, ["DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path)])
    model = build_model(cfg)
    results = Trainer.test(cfg, model)
    bbox, sr = results["bbox"], results["sr_quality"]
    for key in ("AP", "AP50", "APs", "AP_vt", "AP_t", "AP_s_tod", "ARs"):
        assert key in bbox
    assert set(sr) == {"PSNR_SR", "SSIM_SR", "PSNR_bicubic", "SSIM_bicubic", "PSNR_gain", "SSIM_gain"}
    assert sr["PSNR_gain"] == pytest.approx(sr["PSNR_SR"] - sr["PSNR_bicubic"])
    # an untrained residual head is bicubic (only LR values clamped for the evaluator's bicubic differ)
    assert 30 < sr["PSNR_bicubic"] < 60 and abs(sr["PSNR_gain"]) < 0.05
    with torch.no_grad():  # the SR image was switched on only for the test
        assert "sr" not in model.eval()([sample(64, 64, [], [])])[0]


def test_eval_only_on_real_low_resolution_input(synthetic_root, tmp_path):
    """--lr-input: the test images reach the backbone at their own size (no degradation)."""
    env = dict(os.environ, SDCONET_DATASETS=synthetic_root)
    weights = str(tmp_path / "w.pth")
    model = build_model(load_cfg(TINY))
    from detectron2.checkpoint import DetectionCheckpointer
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("w")
    common = ["--config-file", TINY, "--eval-only", "MODEL.WEIGHTS", weights, "DATALOADER.NUM_WORKERS", "0"]
    log = run_train_net(*common[:3], "--lr-input", *common[3:], "OUTPUT_DIR", str(tmp_path / "lr"),
                        cwd=str(tmp_path), env=env)
    assert degrade_test_of(tmp_path / "lr") is False
    assert "Evaluation results for bbox" in log
    log = run_train_net(*common, "OUTPUT_DIR", str(tmp_path / "hr"), cwd=str(tmp_path), env=env)
    assert degrade_test_of(tmp_path / "hr") is True


def degrade_test_of(output_dir):
    """MODEL.SDCONET.DEGRADE.TEST of the config train_net saved in output_dir."""
    import yaml
    with open(output_dir / "config.yaml") as f:
        return yaml.safe_load(f)["MODEL"]["SDCONET"]["DEGRADE"]["TEST"]
