"""tools/train_net.py --dry-run on a paper config: a tiny NWPU VHR-10 release, prepared by the real
script, and Swin-T weights saved from timm; plus the registration of a COCO json of one's own.

The dry run must print the training data's summary and the losses and exit 0, and stop with
exit status 1 and a message naming both numbers when NUM_CLASSES does not match the data.
"""
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter

import cv2
import numpy as np
import pytest
import timm
import torch
from common import REPO, TRAIN_NET, run_train_net
from detectron2.data import DatasetCatalog, MetadataCatalog
from sdconet.data import register_sdconet_dataset
from sdconet.data.metadata import NWPU_VHR10_CLASSES

CONFIG = str(REPO / "configs" / "SDCoNet" / "sdconet_swin-t_nwpu.yaml")


def write_nwpu_release(root):
    """Three source images in the original release's layout: one line per object, (x1,y1),(x2,y2),class."""
    rng = np.random.default_rng(0)
    for stem, (w, h) in (("001", (512, 512)), ("002", (300, 260)), ("003", (256, 256))):
        path = root / "positive image set" / f"{stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), rng.integers(40, 216, size=(h, w, 3), dtype=np.uint8))
    (root / "ground truth").mkdir()
    (root / "ground truth" / "001.txt").write_text("(10,20),(60,70),1\n(300,300),(340,330),2\n(100,400),(112,412),10\n")
    (root / "ground truth" / "002.txt").write_text("(5,5),(25,45),3\n(100,100),(200,180),5\n")
    (root / "ground truth" / "003.txt").write_text("(30,30),(50,60),4\n")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(datasets root with NWPU_VHR10_Split, Swin-T state dict file, work dir)."""
    tmp = tmp_path_factory.mktemp("dry_run")
    write_nwpu_release(tmp / "raw")
    spec = importlib.util.spec_from_file_location("prepare_nwpu", REPO / "datasets" / "prepare_nwpu_vhr10.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--src", str(tmp / "raw"), "--out", str(tmp / "datasets"), "--tile", "256", "--overlap", "0",
                 "--test-fraction", "0.34"])
    weights = tmp / "swin_tiny_patch4_window7_224.pth"
    torch.save(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).state_dict(), weights)
    return tmp / "datasets", weights, tmp


def split_json(root, split):
    return root / "NWPU_VHR10_Split" / split / "annotations" / f"instances_{split}.json"


def environment(root):
    return {**os.environ, "SDCONET_DATASETS": str(root), "OMP_NUM_THREADS": "1"}


def test_dry_run_prints_the_data_summary_and_the_losses(prepared):
    root, weights, tmp = prepared
    start = time.perf_counter()
    out = run_train_net("--config-file", CONFIG, "--dry-run", "MODEL.SDCONET.SWIN.PRETRAINED", str(weights),
                        "DATASETS.TRAIN", "('nwpu_vhr10_split_train',)", "OUTPUT_DIR", str(tmp / "never_written"),
                        cwd=tmp, env=environment(root))
    print(f"dry run of {CONFIG} on CPU: {time.perf_counter() - start:.1f} s wall")  # shown with -s; not asserted

    coco = json.loads(split_json(root, "train").read_text())
    per_class = Counter(NWPU_VHR10_CLASSES[a["category_id"] - 1] for a in coco["annotations"])
    summary = out.split("== DATASETS.TRAIN nwpu_vhr10_split_train ==", 1)[1].split("==", 1)[0]
    assert f"images: {len(coco['images'])} " in summary and f"objects: {len(coco['annotations'])}" in summary
    for name in NWPU_VHR10_CLASSES:  # the prepare script's per-class lines, counted from the json
        assert any(line.split() == [*name.split(), str(per_class[name])] for line in summary.splitlines()), name
    assert "objects per size band" in summary and "== DATASETS.TEST nwpu_vhr10_split_test ==" in out

    assert f"MODEL.SDCONET.SWIN.PRETRAINED {weights}" in out
    # the logged counts: every Swin tensor of the file; only the new output norms are not in it
    assert f"Swin weights from {weights}: loaded 169 of 175 backbone tensors; missing 6 (6 of them the new" in out
    assert "reduces SOLVER.IMS_PER_BATCH 16 to 1 image per batch" in out
    lines = itertools.takewhile(lambda line: line.startswith("  "), out.split("losses (", 1)[1].splitlines()[1:])
    losses = dict(item.split("=") for line in lines for item in line.split())
    assert {"loss_class", "loss_bbox", "loss_giou", "loss_class_dn", "loss_saliency", "loss_sr"} <= losses.keys()
    assert all(np.isfinite(float(v)) for v in losses.values()) and float(losses["loss_giou"]) > 0  # a batch with boxes
    assert "dry run: OK" in out and not (tmp / "never_written").exists()


def run_failing(*args, cwd, env):
    proc = subprocess.run([sys.executable, TRAIN_NET, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stderr


def test_dry_run_stops_naming_both_class_counts(prepared):
    root, weights, tmp = prepared
    err = run_failing("--config-file", CONFIG, "--dry-run", "MODEL.SDCONET.SWIN.PRETRAINED", str(weights),
                      "MODEL.SDCONET.NUM_CLASSES", "3", cwd=tmp, env=environment(root))
    assert ("dry run: FAILED: ValueError: MODEL.SDCONET.NUM_CLASSES is 3 but dataset 'nwpu_vhr10_split_train' "
            "(DATASETS.TRAIN) has 10 classes") in err


def test_dry_run_of_a_registered_coco_json_names_a_missing_weights_file(prepared):
    root, weights, tmp = prepared
    images = root / "NWPU_VHR10_Split" / "train" / "images"
    register = ["--register-coco", "mine", str(split_json(root, "train")), str(images)]
    err = run_failing("--config-file", CONFIG, "--dry-run", *register, "DATASETS.TRAIN", "('mine',)",
                      "DATASETS.TEST", "()", "MODEL.SDCONET.NUM_CLASSES", "4", cwd=tmp, env=environment(root))
    assert "MODEL.SDCONET.NUM_CLASSES is 4 but dataset 'mine' (DATASETS.TRAIN) has 10 classes" in err
    err = run_failing("--config-file", CONFIG, "--dry-run", *register, "DATASETS.TRAIN", "('mine',)",
                      "DATASETS.TEST", "()", "MODEL.SDCONET.SWIN.PRETRAINED", str(weights),
                      "MODEL.WEIGHTS", str(tmp / "missing.pth"), cwd=tmp, env=environment(root))
    assert f"dry run: FAILED: FileNotFoundError: Checkpoint {tmp / 'missing.pth'} does not exist" in err


def test_register_sdconet_dataset_takes_the_classes_of_the_json(prepared):
    root, _, _ = prepared
    json_file = split_json(root, "test")
    image_root = root / "NWPU_VHR10_Split" / "test" / "images"
    try:
        register_sdconet_dataset("own_data_test", str(json_file), str(image_root))
        assert MetadataCatalog.get("own_data_test").thing_classes == list(NWPU_VHR10_CLASSES)
        dicts = DatasetCatalog.get("own_data_test")
        coco = json.loads(json_file.read_text())
        assert len(dicts) == len(coco["images"])
        assert sorted(o["category_id"] for d in dicts for o in d["annotations"]) == \
            sorted(a["category_id"] - 1 for a in coco["annotations"])  # contiguous 0..N-1
        register_sdconet_dataset("own_data_test", str(json_file), str(image_root), classes=["a"] * 10)  # replaces
        assert MetadataCatalog.get("own_data_test").thing_classes == ["a"] * 10
        with pytest.raises(FileNotFoundError, match="no_such.json"):
            register_sdconet_dataset("own_data_missing", str(root / "no_such.json"), str(image_root))
    finally:
        DatasetCatalog.remove("own_data_test")
        MetadataCatalog.remove("own_data_test")
    assert "own_data_missing" not in DatasetCatalog.list()
