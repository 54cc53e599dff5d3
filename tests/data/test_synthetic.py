"""Synthetic_RS generator: determinism, valid COCO with the promised content, tight boxes, CLI summary."""
import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from common import REPO
from pycocotools.coco import COCO
from sdconet.data import synthetic, synthetic_shapes
from sdconet.data.metadata import SIZE_BANDS, SYNTHETIC_RS_CLASSES, size_band
from sdconet.data.synthetic import generate_synthetic_dataset, synthetic_split_paths
from torchvision.ops import box_iou

SIZE = 128  # small tiles keep the tests fast; objects keep their pixel sizes


def load_cli():
    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "datasets" / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def files_of(root):
    """{relative path: bytes} of everything generated under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One moderately sized dataset made through the CLI: (root, captured stdout)."""
    root = tmp_path_factory.mktemp("synthetic_cli")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        load_cli().main(["--out", str(root), "--num-train", "70", "--num-test", "14", "--size", str(SIZE),
                         "--seed", "5"])
    return root, out.getvalue()


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_synthetic_dataset(a, num_train=12, num_test=4, size=SIZE, seed=3)
    generate_synthetic_dataset(b, num_train=12, num_test=4, size=SIZE, seed=3)
    generate_synthetic_dataset(c, num_train=12, num_test=4, size=SIZE, seed=4)
    files_a, files_b, files_c = files_of(a), files_of(b), files_of(c)
    assert len(files_a) == 12 + 4 + 2
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    differing = [name for name in files_a if files_a[name] != files_c[name]]
    assert len(differing) == len(files_a)  # every image and both json files change with the seed

    # Rerunning over an existing folder with fewer tiles keeps those tiles' bytes and drops the rest.
    generate_synthetic_dataset(a, num_train=6, num_test=4, size=SIZE, seed=3)
    rerun = files_of(a)
    train_images = sorted(n for n in rerun if n.endswith(".png") and "/train/" in n)
    assert len(train_images) == 6
    assert all(rerun[n] == files_b[n] for n in rerun if n.endswith(".png"))


def test_train_and_test_use_different_seeds(tmp_path):
    generate_synthetic_dataset(tmp_path, num_train=3, num_test=3, size=SIZE, seed=0)
    train_dir, _ = synthetic_split_paths(tmp_path, "train")
    test_dir, _ = synthetic_split_paths(tmp_path, "test")
    for i in range(3):
        assert (train_dir / f"train_{i:05d}.png").read_bytes() != (test_dir / f"test_{i:05d}.png").read_bytes()


def test_coco_content(cli_run):
    root, _ = cli_run
    sizes = []
    for split, count in (("train", 70), ("test", 14)):
        image_dir, json_path = synthetic_split_paths(root, split)
        assert json_path == root / "Synthetic_RS" / split / "annotations" / f"instances_{split}.json"
        coco = COCO(str(json_path))
        assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == \
            list(enumerate(SYNTHETIC_RS_CLASSES, start=1))
        assert len(coco.getImgIds()) == count
        for info in coco.loadImgs(coco.getImgIds()):
            image = cv2.imread(str(image_dir / info["file_name"]), cv2.IMREAD_UNCHANGED)
            assert image.shape == (info["height"], info["width"], 3) == (SIZE, SIZE, 3)
            assert image.dtype == np.uint8
        annotations = coco.loadAnns(coco.getAnnIds())
        assert len({a["id"] for a in annotations}) == len(annotations)
        for ann in annotations:
            x, y, w, h = ann["bbox"]
            assert ann["category_id"] in (1, 2, 3, 4) and ann["iscrowd"] == 0
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= SIZE + 1e-6 and y + h <= SIZE + 1e-6
            assert ann["area"] == pytest.approx(w * h, abs=0.01)
            sizes.append((w * h) ** 0.5)
        if split == "train":
            present = {a["category_id"] for a in annotations}
            assert present == {1, 2, 3, 4}
            empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=[i])]
            assert 0.03 <= len(empty) / count <= 0.15
            per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
            assert max(per_image) <= synthetic.MAX_OBJECTS_PER_TILE and np.mean(per_image) > 3
    sizes = np.array(sizes)
    assert np.mean((sizes >= 6) & (sizes <= 32)) >= 0.85  # small objects: 3-16 px after x2 down-sampling


def test_objects_do_not_overlap_heavily(cli_run):
    root, _ = cli_run
    _, json_path = synthetic_split_paths(root, "train")
    coco = COCO(str(json_path))
    checked = 0
    for image_id in coco.getImgIds():
        boxes = torch.tensor([a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))]).reshape(-1, 4)
        if len(boxes) < 2:
            continue
        boxes[:, 2:] += boxes[:, :2]
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        assert iou.max() <= 0.1 + 1e-6
        checked += 1
    assert checked > 10


def test_boxes_are_tight_around_the_drawn_object():
    """The box must match the pixels the object covers (COCO convention: pixel i spans [i, i+1))."""
    rng = np.random.default_rng(7)
    water = (90, 70, 40)
    for k in range(80):
        centre = np.array([48.0, 48.0]) + rng.uniform(-1, 1, 2)
        angle = rng.uniform(0, 2 * np.pi)
        shape = (synthetic_shapes.make_vehicle(rng, centre, angle),
                 synthetic_shapes.make_ship(rng, centre, angle, water),
                 synthetic_shapes.make_plane(rng, centre, angle), synthetic_shapes.make_tank(rng, centre))[k % 4]
        mask = np.zeros((96, 96), np.uint8)
        for kind, geometry, _ in shape.parts:
            synthetic_shapes.draw_part(mask, (kind, geometry, 255))
        ys, xs = np.nonzero(mask > 127)
        extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        # Within a pixel on every side: anti-aliasing and thin tips (bow, wing tips) blur the edge.
        assert np.abs(extent - shape.box).max() <= 1.0, (shape.category, extent, shape.box)


def test_cli_prints_class_and_size_histogram_matching_json(cli_run):
    root, stdout = cli_run
    for split in ("train", "test"):
        _, json_path = synthetic_split_paths(root, split)
        coco = json.loads(json_path.read_bytes())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        per_class = {name: 0 for name in SYNTHETIC_RS_CLASSES}
        bands = {name: 0 for _, _, name in SIZE_BANDS}
        for ann in coco["annotations"]:
            per_class[names[ann["category_id"]]] += 1
            bands[size_band(ann["bbox"][2], ann["bbox"][3])] += 1
        block = re.search(rf"Synthetic_RS {split}: (\d+) images \((\d+) empty\), (\d+) objects.*?\n(.*?)\n(.*?)(\n|$)",
                          stdout)
        assert block, stdout
        n_images, n_empty, n_objects = (int(block.group(i)) for i in (1, 2, 3))
        with_objects = {a["image_id"] for a in coco["annotations"]}
        assert (n_images, n_empty, n_objects) == \
            (len(coco["images"]), len(coco["images"]) - len(with_objects), len(coco["annotations"]))
        printed_classes = dict(re.findall(r"([\w-]+)=(\d+)", block.group(4)))
        printed_bands = dict(re.findall(r"([<>]?[\d-]+)=(\d+)", block.group(5)))
        assert {k: int(v) for k, v in printed_classes.items()} == per_class
        assert {k: int(v) for k, v in printed_bands.items()} == bands
