"""Image reading and the dataset mapper: bit depths, channels, bad files named, boxes clipped / dropped, flips and rotations."""
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from common import make_cfg, record
from detectron2.utils import logger as d2_logger
from sdconet.data.mapper import Rot90Transform, SDCoNetDatasetMapper, read_image_any


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


def test_mapper_clips_and_drops_degenerate_boxes(image_dir, caplog, monkeypatch):
    # The warning is rate-limited per call site (detectron2's log_every_n_seconds): start a fresh
    # limiter, or a test that dropped a box just before would silence it.
    monkeypatch.setattr(d2_logger, "_LOG_TIMER", {})
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


def no_flip_cfg():
    cfg = make_cfg()
    cfg.INPUT.SDCONET.HFLIP_PROB = 0.0
    return cfg


# =============================================================================== images (mapper)
# corrupt file      -> IOError naming the file: test_mapper_corrupt_image_names_file
#                      (read level: test_bad_image_names_file, also empty/truncated/missing)
# 16-bit, gray, RGBA -> read level: test_read_image_any_formats; mapper level below


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


# =============================================================================== annotations
# partly outside the image (also negative coordinates) -> clipped; zero width and fully outside to the
# right -> dropped: test_mapper_clips_and_drops_degenerate_boxes


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
