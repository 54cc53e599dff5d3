"""Robustness of the data path to bad annotation files, checked once at load (real json files, real
images written by OpenCV), the --check-data pass of tools/train_net.py and the synthetic-set script.

    negative / zero width or height   dropped at load with a count, whatever the flips
    NaN / infinite box                dropped at load, reported as NaN
    duplicate image ids               error naming the id and both files
    no annotation in the train set    error with the counts (also with FILTER_EMPTY_ANNOTATIONS)
    bbox a string / missing / 3 long  error naming the json, the annotation id and the field
    truncated json                    error naming the json
    NUM_CLASSES != dataset classes    error at build naming both numbers, the dataset and the key
    --check-data                      one summary of every problem; exit status 1 when fatal, else 0
    make_synthetic.py                 refuses counts < 1; a rerun is a no-op; another set needs --overwrite
"""
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from common import REPO, TINY
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from sdconet import add_sdconet_config, get_sdconet_cfg, register_sdconet_datasets
from sdconet.data.dataset_checks import report_data_check
from sdconet.data.datasets import datasets_root
from sdconet.data.mapper import SDCoNetDatasetMapper
from sdconet.data.metadata import SYNTHETIC_RS_CLASSES
from sdconet.engine.trainer import Trainer


@pytest.fixture
def root(tmp_path):
    """A datasets root for hand-written Synthetic_RS files; the default registration is restored after."""
    yield tmp_path
    register_sdconet_datasets(datasets_root())


def write_split(root, split, images, annotations, sizes=None):
    """Write a COCO json and real PNGs (``sizes``: file name -> (h, w) when it differs from the json)."""
    base = Path(root) / "Synthetic_RS" / split
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image in images:
        h, w = (sizes or {}).get(image["file_name"], (image["height"], image["width"]))
        cv2.imwrite(str(base / "images" / image["file_name"]), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    json_file = base / "annotations" / f"instances_{split}.json"
    json_file.write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(SYNTHETIC_RS_CLASSES)]}))
    register_sdconet_datasets(str(root))
    return str(json_file)


def image(i, name=None, h=64, w=64):
    return {"id": i, "file_name": name or f"{i}.png", "height": h, "width": w}


def ann(i, box, image_id=1, category_id=1):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": box, "area": 1.0, "iscrowd": 0}


def tiny_cfg(output_dir, *opts):
    return get_sdconet_cfg(TINY, ["SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
                                  "OUTPUT_DIR", str(output_dir), *opts], freeze=False)


# ----------------------------------------------------------------- 4. negative width, whatever the flips
def test_negative_or_zero_sided_boxes_are_dropped_at_load_even_with_flips(root, caplog):
    write_split(root, "train", [image(1)], [ann(1, [4, 6, 10, 8]), ann(2, [40, 2, -15, 10]), ann(3, [5, 5, 6, 0])])
    with caplog.at_level(logging.WARNING, logger="sdconet"):
        dicts = DatasetCatalog.get("synthetic_rs_train")
    assert [a["bbox"] for a in dicts[0]["annotations"]] == [[4, 6, 10, 8]]
    assert "dropped 2 annotations with an unusable box" in caplog.text
    assert "2 x 'bbox' with a negative or zero width or height" in caplog.text
    assert "annotation id 2: width -15, height 10" in caplog.text and "annotation id 3: width 6, height 0" in caplog.text

    cfg = get_cfg()
    add_sdconet_config(cfg)
    cfg.INPUT.SDCONET.HFLIP_PROB = 1.0  # the flip that would have turned [40, 2, -15, 10] into a valid box
    out = SDCoNetDatasetMapper(cfg, is_train=True)(dicts[0])
    assert out["instances"].gt_boxes.tensor.tolist() == [[50.0, 6.0, 60.0, 14.0]]


def test_nan_and_infinite_boxes_are_reported_as_nan(root, caplog):
    json_file = write_split(root, "train", [image(1)], [ann(1, [4, 6, 10, 8]), ann(2, [float("nan"), 2, 5, 5]),
                                                         ann(3, [1, 2, float("inf"), 5])])
    with caplog.at_level(logging.WARNING, logger="sdconet"):
        dicts = DatasetCatalog.get("synthetic_rs_train")
    assert [a["bbox"] for a in dicts[0]["annotations"]] == [[4, 6, 10, 8]]
    assert f"{json_file}: dropped 2 annotations" in caplog.text
    assert "2 x 'bbox' holds NaN or infinity" in caplog.text
    assert "annotation id 2: 'bbox' is [nan, 2, 5, 5]" in caplog.text and "annotation id 3" in caplog.text
    assert "negative" not in caplog.text and "degenerate" not in caplog.text


# ----------------------------------------------------------------- 5. duplicate image ids
def test_duplicate_image_ids_name_the_id_and_both_files(root):
    json_file = write_split(root, "train", [image(1, "a.png"), image(3, "b.png"), image(3, "c.png")],
                            [ann(1, [1, 1, 5, 5], image_id=3)])
    with pytest.raises(ValueError) as e:
        DatasetCatalog.get("synthetic_rs_train")
    assert f"{json_file} is not a valid COCO detection json" in str(e.value)
    assert "image id 3 is both b.png and c.png" in str(e.value)


# ----------------------------------------------------------------- 6. a train set with no annotation
@pytest.mark.parametrize("filter_empty", [False, True])
def test_train_set_without_any_annotation_is_an_error_with_the_counts(root, filter_empty):
    write_split(root, "train", [image(1), image(2), image(3)], [])
    cfg = tiny_cfg(root / "out", "DATASETS.TEST", (), "DATALOADER.FILTER_EMPTY_ANNOTATIONS", filter_empty)
    with pytest.raises(ValueError, match=r"The training datasets \('synthetic_rs_train',\) hold 3 images but "
                                         r"not a single annotation"):
        Trainer(cfg)


# ----------------------------------------------------------------- 7. malformed bbox
@pytest.mark.parametrize("box, why", [("12,3,4,5", "'bbox' is '12,3,4,5' (str)"),
                                      (None, "no 'bbox'"),
                                      ([1, 2, 3], "'bbox' is [1, 2, 3] (3 values)"),
                                      ([1, "2", 3, 4], "'bbox' is [1, '2', 3, 4] (list)")])
def test_malformed_bbox_names_the_json_the_annotation_id_and_the_field(root, box, why):
    bad = ann(7, box)
    if box is None:
        del bad["bbox"]
    json_file = write_split(root, "train", [image(1)], [ann(1, [1, 1, 5, 5]), bad])
    with pytest.raises(ValueError) as e:
        DatasetCatalog.get("synthetic_rs_train")
    assert f"{json_file} is not a valid COCO detection json" in str(e.value)
    assert f"annotation id 7: {why}" in str(e.value)


def test_truncated_json_is_named(root):
    json_file = write_split(root, "train", [image(1)], [ann(1, [1, 1, 5, 5])])
    text = Path(json_file).read_text()
    Path(json_file).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{json_file} is not valid JSON \(.*line 1, column \d+\): it is truncated"):
        DatasetCatalog.get("synthetic_rs_train")


# ----------------------------------------------------------------- 8. NUM_CLASSES vs the dataset
def test_num_classes_not_matching_the_dataset_is_refused_at_build(synthetic_root, tmp_path):
    cfg = tiny_cfg(tmp_path / "out", "MODEL.SDCONET.NUM_CLASSES", 10)
    with pytest.raises(ValueError, match=r"MODEL.SDCONET.NUM_CLASSES is 10 but dataset 'synthetic_rs_train' "
                                         r"\(DATASETS.TRAIN\) has 4 classes .*set MODEL.SDCONET.NUM_CLASSES 4"):
        Trainer(cfg)
    # --eval-only builds no trainer: the test loader checks its dataset.
    with pytest.raises(ValueError, match=r"NUM_CLASSES is 10 but dataset 'synthetic_rs_test' \(DATASETS.TEST\) has 4"):
        Trainer.build_test_loader(cfg, "synthetic_rs_test")
    cfg = tiny_cfg(tmp_path / "out", "MODEL.SDCONET.NUM_CLASSES", 4)
    assert len(Trainer.build_test_loader(cfg, "synthetic_rs_test").dataset) == 4


# ----------------------------------------------------------------- --check-data
def test_check_data_summarises_every_problem_and_exits_non_zero(root):
    train_json = write_split(root, "train", [image(1), image(2), image(3)],
                             [ann(1, [4, 6, 10, 8]), ann(2, [40, 2, -15, 10]), ann(3, [float("nan"), 1, 2, 2]),
                              ann(4, [1, 1, 5, 5], image_id=3)],
                             sizes={"3.png": (32, 48)})
    (Path(root) / "Synthetic_RS" / "train" / "images" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    test_json = write_split(root, "test", [image(1), image(1, "dup.png")], [ann(5, "1 2 3 4")])
    env = {**os.environ, "SDCONET_DATASETS": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(TINY),
                           "--check-data", "OUTPUT_DIR", str(root / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "checked synthetic_rs_train (DATASETS.TRAIN): 3 images, 2 annotations" in out
    assert "[fatal] 1 x image id listed more than once" in out and "image id 1 is both 1.png and dup.png" in out
    assert f"{test_json}: annotation id 5: 'bbox' is '1 2 3 4' (str)" in out
    assert "[fatal] 1 x image file missing or not decodable" in out and "2.png" in out
    assert "[fatal] 1 x image size differs" in out and "3.png is 48x32, the json says 64x64" in out
    assert f"[warning] 1 x 'bbox' holds NaN or infinity: dropped at load\n    {train_json}: annotation id 3" in out
    assert f"{train_json}: annotation id 2: width -15, height 10" in out
    assert out.rstrip().endswith("data check: 4 fatal problem(s), 2 warning(s): training would stop; fix them first")
    assert not (root / "out").exists()  # it did not train


def test_check_data_passes_a_clean_set_and_flags_num_classes(root):
    write_split(root, "train", [image(1), image(2)], [ann(1, [4, 6, 10, 8]), ann(2, [1, 1, 5, 5], image_id=2)])
    write_split(root, "test", [image(1)], [ann(1, [4, 6, 10, 8])])
    lines = []
    assert report_data_check(tiny_cfg(root / "out"), lines.append) == 0
    assert lines == ["checked synthetic_rs_train (DATASETS.TRAIN): 2 images, 2 annotations",
                     "checked synthetic_rs_test (DATASETS.TEST): 1 images, 1 annotations",
                     "data check: no fatal problem (0 warning(s))"]
    lines.clear()
    assert report_data_check(tiny_cfg(root / "out", "MODEL.SDCONET.NUM_CLASSES", 5), lines.append) == 1
    assert "    synthetic_rs_test: MODEL.SDCONET.NUM_CLASSES is 5 but dataset 'synthetic_rs_test' " \
           "(DATASETS.TEST) has 4 classes (vehicle, ship, plane, storage-tank): set MODEL.SDCONET.NUM_CLASSES 4" in lines


def test_check_data_names_a_train_set_without_annotations(root):
    write_split(root, "train", [image(1), image(2)], [])
    write_split(root, "test", [image(1)], [ann(1, [4, 6, 10, 8])])
    lines = []
    assert report_data_check(tiny_cfg(root / "out"), lines.append) == 1
    assert "[fatal] 1 x training set without a single annotation" in lines
    assert "    synthetic_rs_train: no annotation in any image" in lines


# ----------------------------------------------------------------- datasets/make_synthetic.py
def make_synthetic(*argv):
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "datasets" / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


@pytest.mark.parametrize("flag, value, why", [("--num-train", -3, "must be at least 1, got -3"),
                                              ("--num-test", 0, "must be at least 1, got 0"),
                                              ("--num-train", "ten", "expected a whole number, got 'ten'"),
                                              ("--size", 32, "must be at least 64, got 32")])
def test_make_synthetic_refuses_impossible_counts_naming_the_flag(tmp_path, capsys, flag, value, why):
    with pytest.raises(SystemExit) as e:
        make_synthetic("--out", tmp_path, flag, value)
    assert e.value.code == 2
    assert f"argument {flag}: {why}" in capsys.readouterr().err
    assert not (tmp_path / "Synthetic_RS").exists()


def test_make_synthetic_rerun_is_a_no_op_and_another_set_needs_overwrite(tmp_path, capsys):
    args = ("--out", tmp_path, "--num-train", 2, "--num-test", 1, "--size", 64)
    make_synthetic(*args)
    files = sorted((tmp_path / "Synthetic_RS").rglob("*.*"))
    stamps = [(f, f.stat().st_mtime_ns) for f in files]
    assert len(files) == 2 + 1 + 2
    capsys.readouterr()

    make_synthetic(*args)  # `make demo` twice: nothing rewritten, the summary printed again
    out = capsys.readouterr().out
    assert f"{tmp_path / 'Synthetic_RS'} already holds this set: nothing to do" in out
    assert "Synthetic_RS train: 2 images" in out
    assert [(f, f.stat().st_mtime_ns) for f in files] == stamps

    with pytest.raises(SystemExit) as e:
        make_synthetic("--out", tmp_path, "--num-train", 3, "--num-test", 1, "--size", 64)
    message = str(e.value.code)
    assert f"{tmp_path / 'Synthetic_RS'} already holds another Synthetic_RS set" in message
    assert "holds 2 tiles of size 64, seed 0 (asked: 3 tiles of size 64, seed 0)" in message
    assert "--overwrite" in message
    assert [(f, f.stat().st_mtime_ns) for f in files] == stamps  # nothing replaced

    summary = make_synthetic("--out", tmp_path, "--num-train", 3, "--num-test", 1, "--size", 64, "--overwrite")
    assert summary["train"]["images"] == 3
    assert len(list((tmp_path / "Synthetic_RS" / "train" / "images").glob("*.png"))) == 3

    # An interrupted run leaves a split without its json (written last): the next run with the same
    # arguments finishes it without --overwrite.
    (tmp_path / "Synthetic_RS" / "test" / "annotations" / "instances_test.json").unlink()
    summary = make_synthetic("--out", tmp_path, "--num-train", 3, "--num-test", 1, "--size", 64)
    assert "nothing to do" not in capsys.readouterr().out
    assert summary["test"]["images"] == 1
    assert (tmp_path / "Synthetic_RS" / "test" / "annotations" / "instances_test.json").is_file()
