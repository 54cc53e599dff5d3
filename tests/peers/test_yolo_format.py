"""Our XYXY boxes <-> YOLO ``cls cx cy w h`` lines, and the dataset folder the Ultralytics peer trains on.
No ultralytics needed: the conversion must hold where the benchmark extra is not installed."""
import numpy as np
import pytest
import yaml
from PIL import Image
from sdconet.peers.yolo_format import from_yolo_lines, to_yolo_lines, write_yolo_dataset


def test_hand_computed_lines():
    """A box touching the right/bottom border, a 1-px box and several classes, checked by hand (128 x 64)."""
    boxes = [[96, 32, 128, 64], [10, 20, 11, 21], [0, 0, 64, 32]]
    lines = to_yolo_lines(boxes, [3, 0, 1], 128, 64)
    assert lines == ["3 0.875000 0.750000 0.250000 0.500000",
                     "0 0.082031 0.320312 0.007812 0.015625",
                     "1 0.250000 0.250000 0.500000 0.500000"]
    back, classes = from_yolo_lines(["2 0.5 0.25 0.125 0.5", ""], 128, 64)
    np.testing.assert_allclose(back, [[56, 0, 72, 32]])
    assert back.dtype == np.float32 and classes.dtype == np.int64 and classes.tolist() == [2]


def test_clips_to_image_and_drops_empty_boxes():
    """Ultralytics rejects labels outside [0, 1]: a box over the border is clipped, one outside is dropped."""
    lines = to_yolo_lines([[-4, 60, 8, 70], [70, 10, 90, 20], [5, 5, 5, 9]], [1, 2, 3], 64, 64)
    boxes, classes = from_yolo_lines(lines, 64, 64)
    np.testing.assert_allclose(boxes, [[0, 60, 8, 64]], atol=1e-3)
    assert classes.tolist() == [1]


def test_round_trips():
    """Pixels -> lines -> pixels within 1e-3 px at 128 px, and lines -> pixels -> lines unchanged."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 120, (50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 8, (50, 2))], axis=1).clip(0, 128)
    classes = rng.integers(0, 4, 50)
    back, back_classes = from_yolo_lines(to_yolo_lines(boxes, classes, 128, 128), 128, 128)
    np.testing.assert_allclose(back, boxes, atol=1e-3)
    np.testing.assert_array_equal(back_classes, classes)
    lines = ["0 0.500000 0.500000 0.250000 0.125000", "3 0.031250 0.968750 0.062500 0.062500"]
    assert to_yolo_lines(*from_yolo_lines(lines, 128, 128), 128, 128) == lines


def test_empty_image():
    assert to_yolo_lines(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 128, 128) == []
    boxes, classes = from_yolo_lines([], 128, 128)
    assert boxes.shape == (0, 4) and classes.shape == (0,)


def test_mismatched_lengths_and_bad_lines_fail():
    with pytest.raises(ValueError, match="2 boxes but 1 classes"):
        to_yolo_lines([[0, 0, 1, 1], [1, 1, 2, 2]], [0], 8, 8)
    with pytest.raises(ValueError, match="5 fields"):
        from_yolo_lines(["0 0.5 0.5 0.1"], 8, 8)


def test_written_dataset_reads_back(tmp_path):
    """PNG pixels, label files (empty for an image without objects) and data.yaml read back equal."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(3)]
    targets = [{"boxes": np.array([[1, 2, 10, 12], [30, 0, 48, 32]], np.float32), "classes": np.array([0, 2])},
               {"boxes": np.zeros((0, 4), np.float32), "classes": np.zeros(0, np.int64)},
               {"boxes": np.array([[5, 5, 6, 6]], np.float32), "classes": np.array([1])}]
    data_yaml = write_yolo_dataset(tmp_path, "train", images, targets, ["vehicle", "ship", "plane"])
    for i, (image, target) in enumerate(zip(images, targets)):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "images" / "train" / f"{i:06d}.png")), image)
        lines = (tmp_path / "labels" / "train" / f"{i:06d}.txt").read_text().splitlines()
        boxes, classes = from_yolo_lines(lines, 48, 32)
        np.testing.assert_allclose(boxes, target["boxes"], atol=1e-3)
        np.testing.assert_array_equal(classes, target["classes"])
    assert (tmp_path / "labels" / "train" / "000001.txt").read_text() == ""
    data = yaml.safe_load(data_yaml.read_text())
    assert data == {"path": str(tmp_path.resolve()), "train": "images/train", "val": "images/train",
                    "names": {0: "vehicle", 1: "ship", 2: "plane"}}
    write_yolo_dataset(tmp_path, "train", images[:1], targets[:1], ["vehicle", "ship", "plane"])
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == ["000000.png"]  # no stale images
    write_yolo_dataset(tmp_path, "val", images[1:], targets[1:], ["vehicle", "ship", "plane"])
    assert yaml.safe_load(data_yaml.read_text())["val"] == "images/val"


def test_rejects_non_rgb_images(tmp_path):
    with pytest.raises(ValueError, match="image 0: expected uint8"):
        write_yolo_dataset(tmp_path, "train", [np.zeros((8, 8), np.uint8)],
                           [{"boxes": np.zeros((0, 4)), "classes": np.zeros(0)}], ["a"])
