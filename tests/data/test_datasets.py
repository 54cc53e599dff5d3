"""Dataset registration and loading: names, the authors' layout, category mapping, empty or unknown data named."""
import json
import logging
import os

import pytest
from common import tiny_trainer, write_coco
from detectron2.data import DatasetCatalog, MetadataCatalog
from sdconet import register_sdconet_datasets
from sdconet.data.datasets import DATASETS
from sdconet.data.metadata import SYNTHETIC_RS_CLASSES


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
