"""Robustness matrix: what SDCoNet does with bad input, bad configs and failures during training.

Each case asserts the message the user sees or the state left behind. Cases tested elsewhere are
listed where they belong, with the test that covers them, so this file shows the whole matrix:

    images      corrupt / truncated / empty / missing file   IOError naming the file (mapper, training loop)
                16-bit, gray, RGBA, float with NaN            read as 3-channel uint8, boxes kept
                large (4000x6000)                             kept whole
                beyond OpenCV's pixel limit                   IOError naming the file
    boxes       negative, inverted, outside, zero-area, NaN   dropped, counted in the log
                partly outside                                clipped
    categories  unknown ids                                   dropped, counted in the log
    datasets    no image / nothing left after filtering       error naming the dataset
    config      unknown key (file, command line)              error naming the key
                impossible value                              ValueError naming the key
    training    NaN loss                                      FloatingPointError naming iteration and loss,
                                                              last checkpoint unchanged and loadable
                diverging (NaN predictions)                   the same
                SIGKILL                                       --resume continues from the last checkpoint
                disk full while saving                        previous checkpoint intact, no temp file;
                                                              error says so

Siblings: test_robustness_imagery.py (GeoTIFF bands / bit depths, predict.py inputs and flags),
test_robustness_data.py (COCO json checks, --check-data, make_synthetic.py),
test_robustness_checkpoints.py (damaged checkpoints, resume fallback, weights of another model,
--eval-only without weights), test_robustness_export.py (ONNX export of SDCoNet).
"""
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.utils import logger as d2_logger
from detectron2.utils.env import seed_all_rng

from sdconet import add_sdconet_config, register_sdconet_datasets
from sdconet.data.mapper import SDCoNetDatasetMapper
from sdconet.data.metadata import SYNTHETIC_RS_CLASSES
from sdconet.engine.trainer import Trainer
from test_data_path import image_dir, make_cfg, record, restore_default_registration, write_coco  # noqa: F401
from test_model_e2e import REPO, TINY, load_cfg, run_train_net

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tiny_trainer(output_dir, *opts):
    """The tiny DINO on the synthetic set, seeded like tools/train_net.py (no evaluation)."""
    cfg = load_cfg(TINY, ["SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0, "DATASETS.TEST", (),
                          "SEED", 0, "OUTPUT_DIR", str(output_dir), *opts])
    seed_all_rng(cfg.SEED)
    return Trainer(cfg)


def no_flip_cfg():
    cfg = make_cfg()
    cfg.INPUT.SDCONET.HFLIP_PROB = 0.0
    return cfg


# =============================================================================== images (mapper)
# corrupt file      -> IOError naming the file: test_data_path.py::test_mapper_corrupt_image_names_file
#                      (read level: test_data_path.py::test_bad_image_names_file, also empty/truncated/missing)
# 16-bit, gray, RGBA -> read level: test_data_path.py::test_read_image_any_formats; mapper level below


@pytest.mark.parametrize("kind", ["truncated", "empty", "missing"])
def test_mapper_unreadable_image_names_the_file(image_dir, kind):
    _, paths = image_dir
    path = paths.get(kind, os.path.join(os.path.dirname(paths["png8"]), "missing.png"))
    mapper = SDCoNetDatasetMapper(make_cfg(), is_train=True)
    with pytest.raises(IOError) as e:
        mapper(record(path, 20, 30, [([2, 3, 4, 5], 0)]))
    assert path in str(e.value)


@pytest.mark.parametrize("kind", ["tif16", "gray", "rgba", "float_nan"])
def test_mapper_reads_any_bit_depth_and_channel_count(image_dir, tmp_path, kind):
    bgr, paths = image_dir
    if kind == "float_nan":  # a float raster with no-data holes, as GeoTIFF exports have
        raster = bgr.astype(np.float32) / 255.0
        raster[5:8, 10:20] = np.nan
        paths[kind] = str(tmp_path / "float.tif")
        cv2.imwrite(paths[kind], raster)
    out = SDCoNetDatasetMapper(no_flip_cfg(), is_train=True)(record(paths[kind], 20, 30, [([2, 3, 4, 5], 1)]))
    image = out["image"]
    assert image.shape == (3, 20, 30) and image.dtype == torch.uint8
    assert image.float().std() > 10  # the content survived, not a flat or black image
    assert out["instances"].gt_boxes.tensor.tolist() == [[2.0, 3.0, 6.0, 8.0]]


def test_mapper_keeps_a_large_image_whole(tmp_path):
    path = str(tmp_path / "large.png")
    image = np.zeros((4000, 6000), np.uint8)
    image[1000:1010, 5000:5020] = 255
    cv2.imwrite(path, image)
    out = SDCoNetDatasetMapper(no_flip_cfg(), is_train=True)(record(path, 4000, 6000, [([5000, 1000, 20, 10], 2)]))
    assert out["image"].shape == (3, 4000, 6000)
    assert out["image"][:, 1000:1010, 5000:5020].min() == 255 and out["image"].sum() == 3 * 255 * 200
    assert out["instances"].gt_boxes.tensor.tolist() == [[5000.0, 1000.0, 5020.0, 1010.0]]


def write_png_claiming_size(path, width, height):
    """A valid 8x8 PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    import struct
    import zlib

    data = bytearray(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(data)


def test_mapper_image_beyond_opencv_pixel_limit_names_the_file(tmp_path):
    path = str(tmp_path / "bomb.png")
    write_png_claiming_size(path, 100_000, 100_000)  # 10^10 pixels: more than OpenCV's 2^30 limit
    with pytest.raises(IOError) as e:
        SDCoNetDatasetMapper(make_cfg(), is_train=True)(record(path, 100_000, 100_000, []))
    assert path in str(e.value)


@pytest.mark.parametrize("kind, workers", [("corrupt", 1), ("missing", 0)])
def test_bad_image_in_training_set_stops_training_naming_the_file(synthetic_root, tmp_path, kind, workers):
    """Also through a DataLoader worker process the error names the file. (Ending that worker
    takes the DataLoader ~5 s, hence one case with a worker.)"""
    path = os.path.join(synthetic_root, "Synthetic_RS", "train", "images", "train_00003.png")
    if kind == "corrupt":
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    else:
        os.remove(path)
    # All 8 images in the first batch.
    trainer = tiny_trainer(tmp_path / "out", "SOLVER.IMS_PER_BATCH", 8, "DATALOADER.NUM_WORKERS", workers,
                           "SOLVER.MAX_ITER", 1)
    trainer.resume_or_load(resume=False)
    with pytest.raises(OSError, match="train_00003.png"):
        trainer.train()


# =============================================================================== annotations
# partly outside the image (also negative coordinates) -> clipped; zero width and fully outside to the
# right -> dropped: test_data_path.py::test_mapper_clips_and_drops_degenerate_boxes


def test_mapper_drops_inverted_outside_empty_and_nan_boxes_with_a_count(image_dir, caplog):
    _, paths = image_dir
    mapper = SDCoNetDatasetMapper(no_flip_cfg(), is_train=True)
    boxes = [([-12, 2, 5, 5], 0),           # entirely at negative x
             ([10, 5, -4, 6], 1),           # negative width: inverted
             ([3, 12, 5, -8], 2),           # negative height: inverted
             ([2, 25, 4, 4], 3),            # below the 20 px high image
             ([5, 5, 4, 0], 0),             # zero height
             ([6, 6, 0, 0], 1),             # a point
             ([float("nan"), 2, 4, 4], 2),  # NaN coordinate
             ([4, 4, 2, 2], 3)]             # valid
    d2_logger._LOG_TIMER.clear()  # the drop message is rate-limited per call site across tests
    with caplog.at_level(logging.WARNING):
        out = mapper(record(paths["png8"], 20, 30, boxes))
    assert out["instances"].gt_boxes.tensor.tolist() == [[4.0, 4.0, 6.0, 6.0]]
    assert out["instances"].gt_classes.tolist() == [3]
    assert mapper.num_dropped == 7
    assert "Dropped 7 degenerate box(es)" in caplog.text and "rgb.png" in caplog.text


def synthetic_json_path(root, split="train"):
    return os.path.join(root, "Synthetic_RS", split, "annotations", f"instances_{split}.json")


def test_unknown_category_ids_are_dropped_with_a_count(tmp_path, restore_default_registration, caplog):
    images = [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}]
    annotations = [{"id": i, "image_id": 1, "category_id": c, "bbox": [1, 2, 10, 10], "area": 100, "iscrowd": 0}
                   for i, c in enumerate([1, 7, 4, 0, 2], start=1)]  # 7 and 0 are no category of the json
    write_coco(synthetic_json_path(str(tmp_path)), images, annotations, SYNTHETIC_RS_CLASSES)
    register_sdconet_datasets(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sdconet"):
        dicts = DatasetCatalog.get("synthetic_rs_train")
    assert [a["category_id"] for a in dicts[0]["annotations"]] == [0, 3, 1]
    assert "dropped 2 annotations with unknown category ids" in caplog.text


# images listed but missing -> test_bad_image_in_training_set_stops_training_naming_the_file[missing]
# (and the mapper: test_mapper_unreadable_image_names_the_file[missing])


# =============================================================================== datasets
# detectron2's get_detection_dataset_dicts stops first, naming the dataset (with python -O, the Trainer's
# own check: "The training datasets (...) hold 0 images but not a single annotation").
def test_dataset_without_images_is_named(tmp_path, restore_default_registration):
    write_coco(synthetic_json_path(str(tmp_path)), [], [], SYNTHETIC_RS_CLASSES)
    register_sdconet_datasets(str(tmp_path))
    with pytest.raises(AssertionError, match="Dataset 'synthetic_rs_train' is empty"):
        tiny_trainer(tmp_path / "out")


def test_dataset_left_empty_by_filtering_is_named(tmp_path, restore_default_registration):
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (1, 2)]
    write_coco(synthetic_json_path(str(tmp_path)), images, [], SYNTHETIC_RS_CLASSES)
    register_sdconet_datasets(str(tmp_path))
    # Not detectron2's "No valid data found": no annotation at all is an error with the counts
    # (test_robustness_data.py::test_train_set_without_any_annotation_is_an_error_with_the_counts).
    with pytest.raises(ValueError, match=r"The training datasets \('synthetic_rs_train',\) hold 2 images but not"):
        tiny_trainer(tmp_path / "out", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", True)


# =============================================================================== configs
# impossible values, named by check_sdconet_config:
#   MODEL.SDCONET.DEGRADE.SCALE 3, INPUT.SDCONET.HFLIP_PROB 1.5 -> test_data_path.py::test_impossible_config_names_key
#   MODEL.SDCONET.SALIENCY.LEVEL_RATIOS / LAYER_RATIOS outside (0, 1] or of the wrong length
#       -> test_data_path.py::test_impossible_selection_ratios_are_refused
#   MODEL.SDCONET.SWIN.OUT_FEATURES without res3 for SR -> test_data_path.py::test_sr_branch_needs_its_skip_features
#   SOLVER.IMS_PER_BATCH not a multiple of the processes -> test_distributed.py::test_total_batch_must_split_evenly_over_processes


def test_unknown_key_in_config_file_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f'_BASE_: "{TINY}"\nMODEL:\n  SDCONET:\n    SALIENCY:\n      LEVEL_RATIO: (0.5, 1.0, 1.0, 1.0)\n')
    cfg = get_cfg()
    add_sdconet_config(cfg)
    with pytest.raises(KeyError, match=r"MODEL\.SDCONET\.SALIENCY\.LEVEL_RATIO"):
        cfg.merge_from_file(str(path))


def test_unknown_key_on_command_line_is_named():
    with pytest.raises(AssertionError, match=r"Non-existent key: SOLVER\.BASE_LRR"):  # yacs' merge_from_list
        load_cfg(TINY, ["SOLVER.BASE_LRR", 0.1])


@pytest.mark.parametrize("key, value", [
    ("MODEL.SDCONET.TRANSFORMER.NUM_HEADS", 5),  # must divide the 64 channels of the tiny neck
    ("SOLVER.AMP.DTYPE", "float8"),
    ("TEST.SDCONET.AMP.DTYPE", "float8"),
    ("SOLVER.EMA.DECAY", 1.0),
    ("SOLVER.GRADIENT_ROUTING.MODE", "average"),
])
def test_impossible_value_is_named(key, value):
    with pytest.raises(ValueError, match="Invalid config: " + key.replace(".", r"\.")):
        load_cfg(TINY, [key, value])


def test_fp16_inference_on_cpu_is_refused_with_its_key():
    with pytest.raises(ValueError, match=r"TEST\.SDCONET\.AMP\.DTYPE='float16': float16 needs CUDA"):
        load_cfg(TINY, ["TEST.SDCONET.AMP.ENABLED", True, "TEST.SDCONET.AMP.DTYPE", "float16", "MODEL.DEVICE", "cpu"])


# =============================================================================== failures in training
def assert_checkpoint_intact(trainer, out, before):
    """Every file in ``out`` is as it was, and the last checkpoint loads into a fresh model with
    the weights the trainer still holds (no update was made from the bad step)."""
    assert {name: sha256(os.path.join(out, name)) for name in os.listdir(out) if name.endswith(".pth")} == before
    with open(os.path.join(out, "last_checkpoint")) as f:
        last = os.path.join(out, f.read().strip())
    model = build_model(trainer.cfg)
    DetectionCheckpointer(model).load(last)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


class FingerprintCheckpoints(HookBase):
    """After every step (and the checkpointer): the hash of each checkpoint file in ``out``."""

    def __init__(self, out):
        self.out, self.files = out, {}

    def after_step(self):
        self.files = {name: sha256(os.path.join(self.out, name)) for name in os.listdir(self.out)
                      if name.endswith(".pth")}


def test_nan_loss_stops_naming_the_iteration_and_the_loss(synthetic_root, tmp_path):
    """A loss weight that came out NaN (a sweep script's 0/0), given to a resumed run."""
    out = str(tmp_path / "out")
    first = tiny_trainer(out, "SOLVER.MAX_ITER", 1, "SOLVER.CHECKPOINT_PERIOD", 1)
    first.resume_or_load(resume=False)
    first.train()
    before = {name: sha256(os.path.join(out, name)) for name in os.listdir(out) if name.endswith(".pth")}
    assert "model_final.pth" in before

    trainer = tiny_trainer(out, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 1,
                           "MODEL.SDCONET.LOSS.GIOU_WEIGHT", float("nan"))
    trainer.resume_or_load(resume=True)
    with pytest.raises(FloatingPointError, match=r"iteration 1: \{.*'loss_giou': nan") as e:
        trainer.train()
    assert "loss_bbox" not in str(e.value)  # only the non-finite losses are named
    assert_checkpoint_intact(trainer, out, before)


def test_diverging_training_stops_naming_the_iteration(synthetic_root, tmp_path):
    """An absurd learning rate: after the first update the weights are ~1e30 and everything overflows."""
    out = str(tmp_path / "out")
    trainer = tiny_trainer(out, "SOLVER.MAX_ITER", 5, "SOLVER.CHECKPOINT_PERIOD", 1, "SOLVER.BASE_LR", 1e30)
    fingerprint = FingerprintCheckpoints(out)
    trainer.register_hooks([fingerprint])
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at iteration \d+"):
        trainer.train()
    assert fingerprint.files, "no checkpoint was written before the failure"
    assert_checkpoint_intact(trainer, out, fingerprint.files)


def test_killed_training_resumes_from_the_last_checkpoint(synthetic_root, tmp_path):
    env = dict(os.environ, SDCONET_DATASETS=synthetic_root, OMP_NUM_THREADS="1")
    out = str(tmp_path / "run")
    common = ["--config-file", TINY, "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
              "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()", "OUTPUT_DIR", out]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, TRAIN_NET, *common, "SOLVER.MAX_ITER", "100000"],
                                cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            # last_checkpoint is tagged just after the checkpoint file is renamed into place: wait for the tag
            while not os.path.exists(os.path.join(out, "last_checkpoint")):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.time() < deadline, "no checkpoint after 300 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with open(os.path.join(out, "last_checkpoint")) as f:
        last = f.read().strip()
    iteration = torch.load(os.path.join(out, last), map_location="cpu", weights_only=False)["iteration"]
    assert last == f"model_{iteration:07d}.pth" and iteration >= 1

    log = run_train_net("--resume", *common, "SOLVER.MAX_ITER", str(iteration + 3), cwd=str(tmp_path), env=env)
    assert f"Starting training from iteration {iteration + 1}" in log
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert final["iteration"] == iteration + 2


# ------------------------------------------------------------------------------- disk full
# A real failing write: the child process may not write files beyond `limit` bytes
# (RLIMIT_FSIZE), and ignores SIGXFSZ so the write fails with EFBIG instead of killing it.
DISK_FULL_CHILD = r"""
import json, os, resource, signal, sys
import torch
from torch import nn
from sdconet.engine.checkpoint import AtomicDetectionCheckpointer

out = sys.argv[1]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 4))
checkpointer = AtomicDetectionCheckpointer(model, out)
checkpointer.save("model_0000001", iteration=1)
limit = os.path.getsize(os.path.join(out, "model_0000001.pth")) // 2
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
with torch.no_grad():
    model[0].weight.add_(1.0)
try:
    checkpointer.save("model_0000002", iteration=2)
    print(json.dumps({"type": None, "message": ""}))
except Exception as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e)}))
"""


def reference_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 4))


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory):
    """Save one checkpoint, then another under a file-size limit half its size."""
    out = tmp_path_factory.mktemp("disk_full")
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_CHILD, str(out)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out), json.loads(proc.stdout.strip().splitlines()[-1])


def test_disk_full_while_saving_keeps_the_previous_checkpoint(disk_full):
    out, error = disk_full
    assert error["type"] is not None, "the save under the file-size limit did not fail"
    assert sorted(os.listdir(out)) == ["last_checkpoint", "model_0000001.pth"]  # no temp file, no partial file
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_0000001.pth"
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Linear(128, 4))
    checkpoint = DetectionCheckpointer(model).load(os.path.join(out, "model_0000001.pth"))
    assert checkpoint["iteration"] == 1
    for name, value in reference_model().state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_disk_full_while_saving_says_the_previous_checkpoint_is_untouched(disk_full):
    _, error = disk_full
    assert error["type"] == "OSError"
    assert "model_0000002.pth" in error["message"] and "File too large" in error["message"]
    assert "previous checkpoint and last_checkpoint are untouched" in error["message"]
