"""Satellite imagery (16-bit, 4/5-band GeoTIFF) read right, and tools/predict.py robust to bad input.

Files are written by rasterio (as GDAL-based tools write satellite scenes), OpenCV and json. The
"8-bit copy" of a 16-bit scene is exact by construction (16-bit = 8-bit x 257 read with "max"
scaling; 12-bit = 8-bit x 16 read with a 0-100 percentile stretch), so reading both must give
the same pixels and the model the same detections.
"""
import json
import os
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import rasterio
import sdconet
import torch
from common import REPO, SDCONET_TINY, TINY
from rasterio.errors import NotGeoreferencedWarning
from sdconet.config import add_sdconet_config, check_sdconet_config
from sdconet.data.image_io import read_image_any
from sdconet.data.mapper import SDCoNetDatasetMapper
from sdconet.data.synthetic import render_tile

sys.path.insert(0, os.path.join(REPO, "tools"))
RED = (slice(40, 60), slice(70, 90))  # rows, cols of the red square of red_scene()


def write_tif(path, bands_chw):
    """A GeoTIFF as rasterio / GDAL write it: bands in file order (R, G, B, ...), 'pixel' interleaved."""
    count, h, w = bands_chw.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=count,
                           dtype=bands_chw.dtype.name) as dst:
            dst.write(bands_chw)
    return path


def scene8(size=128):
    """A rendered synthetic tile (BGR uint8) holding pure black and white pixels (for a 0-100 stretch)."""
    image, _ = render_tile(0, "test", 1, size)
    image = image.copy()
    image[0, 0], image[0, 1] = 0, 255
    return image


def rgb_bands(bgr):
    """HxWx3 BGR -> 3xHxW in R, G, B file order."""
    return np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))


def red_scene():
    """Gray background with a pure red square, as 16-bit R, G, B bands (full scale 65535)."""
    rgb = np.full((3, 100, 120), 30000, np.uint16)
    rgb[:, RED[0], RED[1]] = np.array([65535, 0, 0], np.uint16)[:, None, None]
    return rgb


# ------------------------------------------------------------------ reading
def test_16bit_3band_geotiff_reads_as_its_8bit_copy(tmp_path):
    bgr = scene8()
    path = write_tif(str(tmp_path / "x257.tif"), rgb_bands(bgr).astype(np.uint16) * 257)
    gray_by_opencv = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert gray_by_opencv.ndim == 2  # the bug: OpenCV sees one band of this file
    np.testing.assert_array_equal(read_image_any(path, scaling="max"), bgr)
    np.testing.assert_array_equal(read_image_any(path, format="RGB", scaling="max"), bgr[:, :, ::-1])


def test_default_percentile_stretch_is_joint_over_the_bands(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(100, 4096, (3, 40, 50)).astype(np.uint16)  # 12-bit data with a dark offset
    data[0] //= 2  # a dimmer red band must stay dimmer (a per-band stretch would brighten it)
    path = write_tif(str(tmp_path / "twelve.tif"), data)
    got = read_image_any(path, format="RGB").transpose(2, 0, 1).astype(int)
    low, high = np.percentile(data.astype(np.float64), (0.0, 99.9))
    expected = np.clip(np.rint((data - low) * 255.0 / (high - low)), 0, 255)
    assert np.abs(got - expected).max() <= 1 and (got == expected).mean() > 0.99
    assert got[0].mean() < 0.6 * got[1].mean()
    # 12-bit data with a fixed max of 4095: v * 255 / 4095.
    fixed = read_image_any(path, format="RGB", scaling="max", max_value=4095).transpose(2, 0, 1).astype(int)
    assert np.abs(fixed - np.rint(data * 255.0 / 4095)).max() <= 1


def test_8bit_tiff_reads_bit_identical_to_opencv(tmp_path):
    bgr = scene8(64)
    path = str(tmp_path / "eight.tif")
    cv2.imwrite(path, bgr)
    np.testing.assert_array_equal(read_image_any(path), cv2.imread(path))
    rasterio_written = write_tif(str(tmp_path / "eight_rio.tif"), rgb_bands(bgr))
    np.testing.assert_array_equal(read_image_any(rasterio_written), bgr)


def test_red_object_stays_red_in_reader_predictor_and_mapper(tmp_path):
    path = write_tif(str(tmp_path / "red.tif"), red_scene())
    bgr = read_image_any(path, scaling="max")
    assert (bgr[RED[0], RED[1]] == [0, 0, 255]).all()  # BGR: red is the last channel
    assert (bgr[0, 0] == 117).all()  # 30000 * 255 / 65535 = 116.7, gray
    # Bands (3, 2, 1) show the file's band 3 as red: the red square turns blue.
    swapped = read_image_any(path, scaling="max", bands=(3, 2, 1))
    assert (swapped[RED[0], RED[1]] == [255, 0, 0]).all()

    predictor = sdconet.Predictor(TINY, weights=None, device="cpu", opts=["INPUT.SDCONET.SCALING", "max"])
    np.testing.assert_array_equal(predictor.read_image(path), bgr)
    cfg = predictor.cfg.clone()
    mapped = SDCoNetDatasetMapper(cfg, is_train=False)({"file_name": path, "image_id": 0, "height": 100, "width": 120})
    assert mapped["image"].shape == (3, 100, 120)
    assert mapped["image"][:, 50, 80].tolist() == [0, 0, 255] and cfg.INPUT.FORMAT == "BGR"


def test_4band_ignores_the_4th_and_5band_uses_configured_bands(tmp_path):
    bgr = scene8(64)
    rgb16 = rgb_bands(bgr).astype(np.uint16) * 257
    junk = np.random.default_rng(1).integers(0, 65536, (2, 64, 64)).astype(np.uint16)
    four = write_tif(str(tmp_path / "four.tif"), np.concatenate([rgb16, junk[:1]]))
    np.testing.assert_array_equal(read_image_any(four, scaling="max"), bgr)
    # Sentinel-2 style stack: 1 = aerosol, 2 = blue, 3 = green, 4 = red, 5 = red edge.
    five = write_tif(str(tmp_path / "five.tif"), np.stack([junk[0], rgb16[2], rgb16[1], rgb16[0], junk[1]]))
    np.testing.assert_array_equal(read_image_any(five, scaling="max", bands=(4, 3, 2)), bgr)
    default = read_image_any(five, scaling="max")  # no longer "not an image": the first three bands
    np.testing.assert_array_equal(default[:, :, 0], bgr[:, :, 1])  # shown blue <- band 3 = green
    np.testing.assert_array_equal(default[:, :, 1], bgr[:, :, 0])  # shown green <- band 2 = blue
    gray = read_image_any(five, scaling="max", bands=(4,))
    assert (gray == bgr[:, :, 2:3]).all()
    with pytest.raises(IOError) as e:
        read_image_any(five, bands=(6, 3, 2))
    assert five in str(e.value) and "has 5 band(s)" in str(e.value) and "[6]" in str(e.value)


def test_bad_tiffs_name_the_file(tmp_path):
    good = write_tif(str(tmp_path / "good.tif"), red_scene())
    truncated = str(tmp_path / "truncated.tif")
    with open(good, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    empty = str(tmp_path / "empty.tif")
    open(empty, "wb").close()
    for path in (truncated, empty, str(tmp_path / "missing.tif")):
        with pytest.raises(IOError) as e:
            read_image_any(path)
        assert path in str(e.value)


@pytest.mark.parametrize("key,value,why", [
    ("BANDS", "(0, 1, 2)", "each >= 1"), ("BANDS", "(1, 2)", "needs 3 band numbers"),
    ("SCALING", "stretch", "must be percentile or max"), ("PERCENTILES", "(99.0, 1.0)", "0 <= low < high <= 100"),
    ("PERCENTILES", "(0.0, 101.0)", "0 <= low < high <= 100"), ("MAX_VALUE", "-1", "must be >= 0")])
def test_read_keys_are_checked(key, value, why):
    from detectron2.config import get_cfg

    cfg = add_sdconet_config(get_cfg())
    cfg.merge_from_list([f"INPUT.SDCONET.{key}", value])
    with pytest.raises(ValueError) as e:
        check_sdconet_config(cfg)
    assert f"INPUT.SDCONET.{key}=" in str(e.value) and why in str(e.value)


# ------------------------------------------------------------------ tools/predict.py
def run_predict(inputs, out, *extra, opts=(), config=TINY):
    """predict.main on ``inputs`` with seeded untrained weights; returns {file stem: (boxes, scores)}."""
    import predict

    torch.manual_seed(0)
    argv = ["--config-file", config, "--weights", "", *inputs, "--output", str(out), "--tile", "128",
            "--overlap", "32", "--score-thresh", "0", "--device", "cpu", *extra]
    predict.main(argv + (["--opts", *opts] if opts else []))
    return detections(out)


def detections(out):
    found = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".geojson"):
            with open(os.path.join(out, name)) as f:
                feats = json.load(f)["features"]
            found[name[:-8]] = (np.array([ft["properties"]["bbox_pixels"] for ft in feats]).reshape(-1, 4),
                                np.array([ft["properties"]["score"] for ft in feats]))
    return found


def assert_same(a, b):
    assert len(a[0]) == len(b[0]) > 0
    np.testing.assert_allclose(a[0], b[0], atol=1e-3, rtol=0)
    np.testing.assert_array_equal(a[1], b[1])


def test_predict_16bit_4band_5band_and_12bit_give_the_8bit_copys_detections(tmp_path):
    bgr = scene8()
    rgb = rgb_bands(bgr)
    junk = np.random.default_rng(2).integers(0, 65536, (2,) + rgb.shape[1:]).astype(np.uint16)
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "copy8.png"), bgr)
    write_tif(str(folder / "x257.tif"), rgb.astype(np.uint16) * 257)
    write_tif(str(folder / "four.tif"), np.concatenate([rgb.astype(np.uint16) * 257, junk[:1]]))
    write_tif(str(folder / "bgr_order.tif"), rgb[::-1].astype(np.uint16) * 257)  # colours swapped
    got = run_predict([str(folder)], tmp_path / "out", opts=["INPUT.SDCONET.SCALING", "max"])
    assert set(got) == {"copy8", "x257", "four", "bgr_order"}
    assert_same(got["x257"], got["copy8"])
    assert_same(got["four"], got["copy8"])
    # The model does see colour: swapped channels give other detections (so the equalities mean something).
    assert not np.allclose(got["bgr_order"][1], got["copy8"][1])

    five = str(tmp_path / "five.tif")
    rgb16 = rgb.astype(np.uint16) * 257
    write_tif(five, np.stack([junk[0], rgb16[2], rgb16[1], rgb16[0], junk[1]]))
    got5 = run_predict([five], tmp_path / "out5",
                       opts=["INPUT.SDCONET.SCALING", "max", "INPUT.SDCONET.BANDS", "(4, 3, 2)"])
    assert_same(got5["five"], got["copy8"])

    twelve = write_tif(str(tmp_path / "twelve.tif"), rgb.astype(np.uint16) * 16)
    got12 = run_predict([twelve], tmp_path / "out12", opts=["INPUT.SDCONET.PERCENTILES", "(0.0, 100.0)"])
    assert_same(got12["twelve"], got["copy8"])


def test_predict_runs_the_sdconet_config_without_degrade(tmp_path):
    # The config asks for TEST.SDCONET.SR_QUALITY, which needs HR input: off for real LR input.
    image = str(tmp_path / "tile.png")
    cv2.imwrite(image, scene8(64))
    got = run_predict([image], tmp_path / "out", config=SDCONET_TINY)
    assert len(got["tile"][0]) > 0
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())) == len(got["tile"][0])


def bad_folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "a_good.png"), scene8(64))
    (folder / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    write_tif(str(folder / "c_good.tif"), rgb_bands(scene8(64)))
    (folder / "d_empty.tif").write_bytes(b"")
    return folder


def test_predict_skips_unreadable_files_and_writes_the_rest(tmp_path, capsys):
    folder = bad_folder(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_predict([str(folder)], out)
    message = str(e.value.code)
    assert "2 of 4 file(s) skipped as unreadable" in message
    assert str(folder / "b_corrupt.png") in message and str(folder / "d_empty.tif") in message
    err = capsys.readouterr().err
    assert f"skipping unreadable file: Cannot decode image file {folder / 'b_corrupt.png'}" in err
    results = json.loads((out / "results.json").read_text())
    assert {os.path.basename(r["file_name"]) for r in results} == {"a_good.png", "c_good.tif"}
    assert set(detections(out)) == {"a_good", "c_good"} and (out / "c_good.png").exists()


def test_predict_strict_stops_at_the_first_unreadable_file(tmp_path):
    folder = bad_folder(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_predict([str(folder)], out, "--strict")
    message = str(e.value.code)
    assert str(folder / "b_corrupt.png") in message and "--strict" in message
    results = json.loads((out / "results.json").read_text())
    assert {os.path.basename(r["file_name"]) for r in results} == {"a_good.png"}
    assert set(detections(out)) == {"a_good"}  # stopped before c_good.tif


@pytest.mark.parametrize("argv,error", [
    (["--batch", "-1"], "argument --batch: must be >= 1, got -1"),
    (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["--batch", "2.5"], "argument --batch: must be an integer, got '2.5'"),
    (["--score-thresh", "nan"], "argument --score-thresh: must be a number in [0, 1], got 'nan'"),
    (["--score-thresh", "1.5"], "argument --score-thresh: must be a number in [0, 1], got '1.5'"),
    (["--nms-iou", "-0.1"], "argument --nms-iou: must be a number in [0, 1], got '-0.1'"),
    (["--tile", "0"], "argument --tile: must be >= 1, got 0"),
    (["--overlap", "-5"], "argument --overlap: must be >= 0, got -5"),
    (["--tile", "256", "--overlap", "256"], "argument --overlap: must be smaller than --tile (256), got 256"),
    (["--draw-max-side", "0"], "argument --draw-max-side: must be >= 1, got 0")])
def test_predict_rejects_bad_arguments_naming_the_flag(tmp_path, capsys, argv, error):
    import predict

    image = str(tmp_path / "tile.png")
    cv2.imwrite(image, scene8(32))
    with pytest.raises(SystemExit) as e:
        predict.main(["--config-file", TINY, image, "--output", str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and error in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_predict_missing_input_is_one_clear_line(tmp_path):
    missing = str(tmp_path / "no_such_scene.tif")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "predict.py"), "--config-file", TINY,
                           missing, "--output", str(tmp_path / "out")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))  # library deprecation notes at import
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"predict.py: error: no such file or folder: {missing}"]
    import predict

    with pytest.raises(SystemExit) as e:  # a pattern that matches nothing
        predict.main(["--config-file", TINY, str(tmp_path / "*.tif"), "--output", str(tmp_path / "out")])
    assert e.value.code == f"predict.py: error: no file matches the pattern: {tmp_path / '*.tif'}"
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit) as e:  # a folder without images
        predict.main(["--config-file", TINY, str(tmp_path), "--output", str(tmp_path / "out")])
    assert e.value.code.startswith("predict.py: error: no image (.png .jpg") and str(tmp_path) in e.value.code
    with pytest.raises(SystemExit) as e:
        predict.main(["--config-file", str(tmp_path / "missing.yaml"), str(tmp_path)])
    assert e.value.code == f"predict.py: error: no such config file: {tmp_path / 'missing.yaml'}"
