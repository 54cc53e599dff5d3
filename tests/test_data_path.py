"""Dataset registration, the mapper (bit depths, channels, bad input, boxes) and degradation."""
import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from sdconet import get_sdconet_cfg, register_sdconet_datasets
from sdconet.data.datasets import DATASETS, datasets_root
from sdconet.data.mapper import Rot90Transform, SDCoNetDatasetMapper, read_image_any
from sdconet.modeling.degradation import Degradation


def make_cfg():
    return get_sdconet_cfg(freeze=False)


def write_coco(path, images, annotations, classes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)]}, f)


@pytest.fixture
def restore_default_registration():
    yield
    register_sdconet_datasets(datasets_root())


# ------------------------------------------------------------------ registration
def test_all_names_registered_with_metadata():
    expected = {"nwpu_vhr10_split": 10, "dota15_split": 16, "hrssd_split": 13, "synthetic_rs": 4}
    for key, n in expected.items():
        for split in ("train", "test"):
            name = f"{key}_{split}"
            assert name in DatasetCatalog.list()
            meta = MetadataCatalog.get(name)
            assert len(meta.thing_classes) == n
            assert meta.evaluator_type == "coco"


def test_registration_is_idempotent(tmp_path, restore_default_registration):
    import importlib

    import sdconet

    importlib.reload(sdconet)  # importing twice must not raise "already registered"
    register_sdconet_datasets()
    register_sdconet_datasets(str(tmp_path))  # another root replaces the entries
    assert MetadataCatalog.get("hrssd_split_test").dataset_root == str(tmp_path)
    assert MetadataCatalog.get("hrssd_split_test").json_file.startswith(str(tmp_path))


def test_unprepared_dataset_names_prepare_command(tmp_path, restore_default_registration):
    register_sdconet_datasets(str(tmp_path))
    for key, info in DATASETS.items():
        with pytest.raises(FileNotFoundError) as e:
            DatasetCatalog.get(f"{key}_train")
        assert info.prepare.split()[1] in str(e.value)  # e.g. datasets/prepare_dota.py
        assert "not prepared" in str(e.value)


def test_loads_authors_layout_and_maps_category_ids(tmp_path, restore_default_registration):
    base = tmp_path / "HRSSD_Split" / "test"
    (base / "images").mkdir(parents=True)
    classes = DATASETS["hrssd_split"].classes
    # Authors' sets may use another json name and category ids that do not start at 1.
    cats = [{"id": 10 + i, "name": n} for i, n in enumerate(classes)]
    with open(base / "annotations.json", "w"):
        pass
    os.makedirs(base / "annotations")
    with open(base / "annotations" / "hrssd_test.json", "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}],
                   "annotations": [{"id": 1, "image_id": 1, "category_id": 12, "bbox": [1, 2, 10, 10],
                                    "area": 100, "iscrowd": 0},
                                   {"id": 2, "image_id": 1, "category_id": 99, "bbox": [1, 2, 10, 10],
                                    "area": 100, "iscrowd": 0}],
                   "categories": cats}, f)
    register_sdconet_datasets(str(tmp_path))
    dicts = DatasetCatalog.get("hrssd_split_test")
    assert len(dicts) == 1 and dicts[0]["file_name"] == str(base / "images" / "a.png")
    assert [a["category_id"] for a in dicts[0]["annotations"]] == [2]  # id 12 -> third class; 99 dropped


# ------------------------------------------------------------------ reading images
@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    paths = {}
    paths["png8"] = str(tmp_path / "rgb.png")
    cv2.imwrite(paths["png8"], bgr)
    paths["gray"] = str(tmp_path / "gray.png")
    cv2.imwrite(paths["gray"], bgr[:, :, 0])
    paths["rgba"] = str(tmp_path / "rgba.png")
    cv2.imwrite(paths["rgba"], np.dstack([bgr, np.full((20, 30), 7, np.uint8)]))
    paths["tif16"] = str(tmp_path / "img16.tif")
    cv2.imwrite(paths["tif16"], bgr.astype(np.uint16) * 16)  # 12-bit data in a 16-bit file
    paths["corrupt"] = str(tmp_path / "corrupt.png")
    with open(paths["corrupt"], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nthis is not really a png")
    paths["empty"] = str(tmp_path / "empty.jpg")
    open(paths["empty"], "wb").close()
    paths["truncated"] = str(tmp_path / "truncated.png")
    with open(paths["png8"], "rb") as f:
        data = f.read()
    with open(paths["truncated"], "wb") as f:
        f.write(data[: len(data) // 3])
    return bgr, paths


def test_read_image_any_formats(image_dir):
    bgr, paths = image_dir
    np.testing.assert_array_equal(read_image_any(paths["png8"]), bgr)
    np.testing.assert_array_equal(read_image_any(paths["png8"], "RGB"), bgr[:, :, ::-1])
    gray = read_image_any(paths["gray"])
    assert gray.shape == (20, 30, 3) and (gray[:, :, 0] == bgr[:, :, 0]).all() and (gray[:, :, 2] == bgr[:, :, 0]).all()
    np.testing.assert_array_equal(read_image_any(paths["rgba"]), bgr)
    img16 = read_image_any(paths["tif16"])
    assert img16.dtype == np.uint8 and img16.shape == (20, 30, 3)
    # 12-bit data is stretched, not divided by 65535 (which would be nearly black); order is kept.
    assert img16.max() >= 250
    flat_in, flat_out = bgr.reshape(-1).astype(int), img16.reshape(-1).astype(int)
    order = np.argsort(flat_in, kind="stable")
    assert (np.diff(flat_out[order]) >= 0).all()


@pytest.mark.parametrize("key", ["corrupt", "empty", "truncated", "missing"])
def test_bad_image_names_file(image_dir, key):
    _, paths = image_dir
    path = paths.get(key, os.path.join(os.path.dirname(paths["png8"]), "missing.png"))
    with pytest.raises(IOError) as e:
        read_image_any(path)
    assert path in str(e.value)


# ------------------------------------------------------------------ mapper
def record(path, h, w, boxes):
    return {"file_name": path, "image_id": 0, "height": h, "width": w,
            "annotations": [{"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": c, "iscrowd": 0}
                            for b, c in boxes]}


def test_mapper_clips_and_drops_degenerate_boxes(image_dir, caplog):
    _, paths = image_dir
    cfg = make_cfg()
    cfg.INPUT.SDCONET.HFLIP_PROB = 0.0
    mapper = SDCoNetDatasetMapper(cfg, is_train=True)
    boxes = [([-5, 2, 10, 6], 0),      # sticks out left: clipped to x 0..5
             ([25, 15, 20, 20], 1),    # sticks out right/bottom: clipped to 25..30 x 15..20
             ([3, 3, 0, 5], 2),        # zero width: dropped
             ([40, 3, 5, 5], 3),       # fully outside: dropped after clipping
             ([4, 4, 2, 2], 1)]        # small but valid
    with caplog.at_level(logging.WARNING):
        out = mapper(record(paths["png8"], 20, 30, boxes))
    inst = out["instances"]
    assert out["image"].shape == (3, 20, 30) and out["image"].dtype == torch.uint8
    torch.testing.assert_close(inst.gt_boxes.tensor, torch.tensor(
        [[0, 2, 5, 8], [25, 15, 30, 20], [4, 4, 6, 6]], dtype=torch.float32))
    assert inst.gt_classes.tolist() == [0, 1, 1]
    assert mapper.num_dropped == 2 and mapper.num_clipped >= 2
    assert "Dropped 2 degenerate box(es)" in caplog.text


def test_mapper_corrupt_image_names_file(image_dir):
    _, paths = image_dir
    mapper = SDCoNetDatasetMapper(make_cfg(), is_train=True)
    with pytest.raises(IOError, match="corrupt.png"):
        mapper(record(paths["corrupt"], 20, 30, []))


def test_mapper_flip_and_rot90_move_boxes_with_pixels(image_dir):
    _, paths = image_dir
    cfg = make_cfg()
    cfg.INPUT.SDCONET.HFLIP_PROB = 1.0
    cfg.INPUT.SDCONET.VFLIP_PROB = 1.0
    out = SDCoNetDatasetMapper(cfg, is_train=True)(record(paths["png8"], 20, 30, [([2, 3, 4, 5], 0)]))
    torch.testing.assert_close(out["instances"].gt_boxes.tensor, torch.tensor([[24.0, 12.0, 28.0, 17.0]]))
    src = read_image_any(paths["png8"])
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), src[::-1, ::-1])

    # A quarter turn of a marked pixel: the box around it must follow it.
    img = np.zeros((20, 30, 3), np.uint8)
    img[3:8, 2:6] = 255  # box x 2..6, y 3..8
    for k in (1, 2, 3):
        tf = Rot90Transform(20, 30, k)
        rot = tf.apply_image(img)
        ys, xs = np.nonzero(rot[:, :, 0])
        box = tf.apply_box(np.array([[2, 3, 6, 8]], dtype=np.float64))[0]
        np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        np.testing.assert_array_equal(tf.inverse().apply_image(rot), img)


def test_mapper_test_mode_has_no_instances(image_dir):
    _, paths = image_dir
    out = SDCoNetDatasetMapper(make_cfg(), is_train=False)(record(paths["gray"], 20, 30, [([2, 3, 4, 5], 0)]))
    assert "instances" not in out and "annotations" not in out and out["image"].shape == (3, 20, 30)


def test_mapper_size_mismatch_is_reported(image_dir):
    _, paths = image_dir
    mapper = SDCoNetDatasetMapper(make_cfg(), is_train=True)
    with pytest.raises(Exception, match="Mismatched image shape"):
        mapper(record(paths["png8"], 21, 30, []))


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


# ------------------------------------------------------------------ config
def test_every_config_key_is_commented():
    import inspect

    from sdconet import config

    lines = inspect.getsource(config.add_sdconet_config).splitlines()
    missing = []
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("_C.") and "=" in s and "CN()" not in s:
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("_C.") and "CN()" not in lines[j]:
                j -= 1  # consecutive keys may share one comment
            if not lines[j].strip().startswith("#") and "#" not in s:
                missing.append(s)
    assert not missing, f"keys without a comment: {missing}"


def test_impossible_config_names_key():
    from sdconet import check_sdconet_config

    cfg = make_cfg()
    cfg.MODEL.SDCONET.DEGRADE.SCALE = 3
    with pytest.raises(ValueError, match=r"MODEL\.SDCONET\.DEGRADE\.SCALE"):
        check_sdconet_config(cfg)
    cfg = make_cfg()
    cfg.INPUT.SDCONET.HFLIP_PROB = 1.5
    with pytest.raises(ValueError, match=r"INPUT\.SDCONET\.HFLIP_PROB"):
        check_sdconet_config(cfg)
    check_sdconet_config(make_cfg())  # defaults are valid


@pytest.mark.parametrize("key, value, why", [
    ("LEVEL_RATIOS", (0.4, 0.8, 1.0, 1.5), r"\(0, 1\]"),
    ("LEVEL_RATIOS", (0.0, 0.8, 1.0, 1.0), r"\(0, 1\]"),
    ("LEVEL_RATIOS", (0.4, 0.8, 1.0), "needs 4 values"),
    ("LAYER_RATIOS", (1.0, 0.8), "needs 6 values"),
])
def test_impossible_selection_ratios_are_refused(key, value, why):
    from sdconet import check_sdconet_config

    cfg = make_cfg()
    cfg.MODEL.SDCONET.SALIENCY.ENABLED = True
    cfg.MODEL.SDCONET.SALIENCY.get(key)  # the key exists
    setattr(cfg.MODEL.SDCONET.SALIENCY, key, value)
    with pytest.raises(ValueError, match=rf"MODEL\.SDCONET\.SALIENCY\.{key}.*{why}"):
        check_sdconet_config(cfg)


def test_sr_branch_needs_its_skip_features():
    from sdconet import check_sdconet_config

    cfg = make_cfg()
    cfg.MODEL.SDCONET.SR.ENABLED = True
    cfg.MODEL.SDCONET.SWIN.OUT_FEATURES = ("res4", "res5")
    cfg.MODEL.SDCONET.NECK.NUM_EXTRA_LEVELS = 2
    with pytest.raises(ValueError, match=r"MODEL\.SDCONET\.SWIN\.OUT_FEATURES.*res3"):
        check_sdconet_config(cfg)


TINY_SDCONET = os.path.join(os.path.dirname(__file__), "..", "configs/quick_schedules/sdconet_tiny_synthetic.yaml")


def test_check_table_names_real_keys_whose_defaults_pass():
    from sdconet.config_checks import RULES, value_of

    cfg = make_cfg()
    refused = [key for key, rule in RULES.items() if not rule.ok(value_of(cfg, key))]  # a misspelt key: AttributeError
    assert not refused, f"the check table refuses the defaults of {refused}"


def test_get_sdconet_cfg_merges_file_and_opts_checks_and_freezes():
    cfg = get_sdconet_cfg(TINY_SDCONET, ["SOLVER.MAX_ITER", 7])
    assert cfg.is_frozen() and cfg.SOLVER.MAX_ITER == 7 and cfg.TEST.SDCONET.SR_QUALITY  # the file's keys, then opts
    copy = get_sdconet_cfg(cfg, ["SOLVER.MAX_ITER", 9], freeze=False)
    assert not copy.is_frozen() and copy.SOLVER.MAX_ITER == 9 and cfg.SOLVER.MAX_ITER == 7  # a copy, not the given one
    with pytest.raises(ValueError, match=r"Invalid config: SOLVER\.MAX_ITER=0: must be >= 1"):
        get_sdconet_cfg(TINY_SDCONET, ["SOLVER.MAX_ITER", 0])


def test_lr_input_opts_evaluate_real_low_resolution_images():
    from sdconet import lr_input_opts

    # Undegraded test images alone contradict the file's SR_QUALITY: there is no HR reference.
    with pytest.raises(ValueError, match=r"TEST\.SDCONET\.SR_QUALITY=True: needs the HR image as reference"):
        get_sdconet_cfg(TINY_SDCONET, ["MODEL.SDCONET.DEGRADE.TEST", False])
    cfg = get_sdconet_cfg(TINY_SDCONET, lr_input_opts())
    assert (cfg.MODEL.SDCONET.DEGRADE.TEST, cfg.TEST.SDCONET.SR_QUALITY) == (False, False)


def test_cpu_fallback_only_when_asked_and_cuda_is_missing(caplog):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    with caplog.at_level(logging.WARNING, logger="sdconet"):
        cfg = get_sdconet_cfg(None, ["MODEL.DEVICE", "cuda"], cpu_fallback=True)
    assert cfg.MODEL.DEVICE == expected
    assert ("CUDA is not available: running on CPU" in caplog.text) == (expected == "cpu")
    assert get_sdconet_cfg(None, ["MODEL.DEVICE", "cuda"]).MODEL.DEVICE == "cuda"
