"""Large scenes read window by window (sdconet.inference.scene_reader) give the whole-image pixels and detections.

Scenes of 300 x 200 px, small enough to decode whole, are written by rasterio as GeoTIFFs; each
window-read tile must equal the same slice of ``read_image_any``'s array (bands, 12/16-bit and float
scaling with whole-scene percentiles, nodata), and ``tools/predict.py`` must find the same boxes and
scores both ways. Tiles without data (nodata, all zero, masked) never reach the model.
"""
import json
import warnings

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from common import TINY, load_tool
from rasterio.errors import NotGeoreferencedWarning
from sdconet.data.image_io import read_image_any
from sdconet.data.synthetic import render_tile
from sdconet.inference.scene_reader import (SceneEnd, SceneStart, TileBatch, WindowedScene, open_scene,
                                            percentiles_from_histogram, scene_stream)
from sdconet.inference.tiling import tile_grid

H, W, TILE, OVERLAP = 200, 300, 128, 32  # tiles start at x 0, 96, 172 and y 0, 72: every border is hit
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)
NODATA_BLOCK = (slice(0, 128), slice(160, 300))  # covers the whole tile at x 172, y 0


def write_geotiff(path, bands_chw, nodata=None, crs="EPSG:32633", mask=None, colormap=None):
    count, h, w = bands_chw.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=count, dtype=bands_chw.dtype.name,
                           crs=crs, transform=TRANSFORM if crs else None, nodata=nodata) as dst:
            dst.write(bands_chw)
            if mask is not None:
                dst.write_mask(mask)
            if colormap is not None:
                dst.write_colormap(1, colormap)
    return str(path)


def rgb8():
    """A rendered synthetic scene, 3 x H x W uint8 in R, G, B file order."""
    tile, _ = render_tile(0, "test", 1, 512)
    return np.ascontiguousarray(tile[:H, :W, ::-1].transpose(2, 0, 1))


def rgb16(seed=0):
    """12-bit-like data (values up to ~10k) with sensor noise: the percentile stretch is not trivial."""
    noise = np.random.default_rng(seed).integers(0, 40, (3, H, W))
    return (rgb8().astype(np.uint16) * 40 + noise).astype(np.uint16)


def scenes(tmp_path):
    """(file, read options) of every kind of raster the windowed path must read as the whole-image path."""
    rng = np.random.default_rng(1)
    data = rgb16()
    data[(slice(None),) + NODATA_BLOCK] = 0
    gray = (rgb16()[1].astype(np.int32) - 5000).astype(np.int16)[None]
    floats = rgb16().astype(np.float32) / 10000
    floats[:, 10:20, 30:60] = np.nan
    palette = {0: (0, 0, 0, 255), 1: (200, 30, 30, 255), 2: (30, 200, 30, 255), 3: (30, 30, 200, 255)}
    five = np.stack([rng.integers(0, 65536, (H, W)), *rgb16()[::-1], rng.integers(0, 65536, (H, W))])
    return [
        (write_geotiff(tmp_path / "nodata.tif", data, nodata=0), {}),
        (str(tmp_path / "nodata.tif"), {"scaling": "max"}),
        (write_geotiff(tmp_path / "five.tif", five.astype(np.uint16)), {"bands": (4, 3, 2)}),
        (write_geotiff(tmp_path / "gray.tif", gray, crs=None), {"percentiles": (2.0, 98.0)}),
        (write_geotiff(tmp_path / "float.tif", floats), {"percentiles": (1.0, 99.0)}),
        (write_geotiff(tmp_path / "eight.tif", rgb8(), nodata=255), {}),
        (write_geotiff(tmp_path / "palette.tif", rgb8()[:1] // 64, colormap=palette), {}),
    ]


def test_histogram_percentiles_are_numpys_to_the_bit():
    rng = np.random.default_rng(0)
    for dtype in (np.uint16, np.int16, np.int8):
        info = np.iinfo(dtype)
        values = np.arange(int(info.min), int(info.max) + 1).astype(dtype)
        for trial in range(40):
            lo, hi = sorted(int(v) for v in rng.integers(int(info.min), int(info.max) + 1, 2))
            data = rng.integers(lo, hi + 1, int(rng.integers(1, 5000))).astype(dtype)
            counts = np.bincount(data.astype(np.int64) - int(info.min), minlength=len(values))
            for percentiles in [(0.0, 99.9), (2.0, 98.0), (0.0, 100.0), tuple(sorted(rng.uniform(0, 100, 2)))]:
                got = percentiles_from_histogram(values, counts, percentiles)
                np.testing.assert_array_equal(got, np.percentile(data, percentiles))


def test_window_tiles_are_the_whole_image_pixels_at_every_border(tmp_path):
    for path, options in scenes(tmp_path):
        whole = read_image_any(path, "BGR", **options)
        if path.endswith("palette.tif"):  # shown in the palette's colours, not as gray
            assert {tuple(p) for p in whole.reshape(-1, 3)} <= {(0, 0, 0), (30, 30, 200), (30, 200, 30), (200, 30, 30)}
            assert len({tuple(p) for p in whole.reshape(-1, 3)}) >= 3
        scene = open_scene(path, **options)
        assert isinstance(scene, WindowedScene) and (scene.height, scene.width) == (H, W)
        tiles = tile_grid(H, W, TILE, OVERLAP)
        assert {t.x1 for t in tiles} == {128, 224, 300} and {t.y1 for t in tiles} == {128, 200}
        for t in tiles + tile_grid(H, W, 512, 0):  # and the whole scene as one tile
            image, has_data = scene.read(t)
            expected = whole[t.y0:t.y1, t.x0:t.x1]
            assert image.dtype == torch.uint8, path
            np.testing.assert_array_equal(image.numpy().transpose(1, 2, 0), expected, err_msg=f"{path} {options} {t}")
            assert has_data == bool(expected.any())
        thumbnail, scale = scene.thumbnail(100)
        assert thumbnail.shape == (67, 100, 3) and thumbnail.dtype == np.uint8 and scale == pytest.approx(1 / 3)
        scene.close()
    # The nodata block holds zeros after scaling, and the tile it covers has no data.
    scene = open_scene(str(tmp_path / "nodata.tif"))
    assert not scene.read(tile_grid(H, W, TILE, OVERLAP)[2])[1]


def test_tiles_without_data_are_skipped_by_value_and_by_the_mask(tmp_path):
    data = rgb8()
    data[:, 72:200, 0:128] = 0  # the tile at x 0, y 72 is all zero
    mask = np.full((H, W), 255, np.uint8)
    mask[0:128, 150:300] = 0  # masks the tile at x 172, y 0 (its pixels are not zero)
    path = write_geotiff(tmp_path / "masked.tif", data, mask=mask)

    def tiles_run(whole):
        items = list(scene_stream([(7, path)], lambda p: open_scene(p, whole=whole), TILE, OVERLAP, 2, 64))
        assert isinstance(items[0], SceneStart) and items[0].index == 7 and len(items[0].tiles) == 6
        assert isinstance(items[-1], SceneEnd) and items[-1].thumbnail.shape == (43, 64, 3)
        batches = [item for item in items[1:-1] if isinstance(item, TileBatch)]
        assert len(batches) == len(items) - 2 and all(len(b.tiles) == len(b.images) <= 2 for b in batches)
        return [(t.x0, t.y0) for b in batches for t in b.tiles]

    assert tiles_run(whole=False) == [(0, 0), (96, 0), (96, 72), (172, 72)]  # grid order, masked one left out
    assert tiles_run(whole=True) == [(0, 0), (96, 0), (172, 0), (96, 72), (172, 72)]  # a decoded PNG has no mask


def test_predict_windowed_geotiff_gives_the_whole_image_detections(tmp_path):
    data = rgb16()
    data[(slice(None),) + NODATA_BLOCK] = 0
    path = write_geotiff(tmp_path / "scene.tif", data, nodata=0)
    got = {}
    for mode in ("window", "whole"):
        predict = load_tool("predict")
        torch.manual_seed(0)
        out = tmp_path / mode
        predict.main(["--config-file", TINY, "--weights", "", path, "--output", str(out), "--tile", str(TILE),
                      "--overlap", str(OVERLAP), "--score-thresh", "0", "--device", "cpu", "--batch", "2",
                      *(["--whole-image"] if mode == "whole" else [])])
        got[mode] = json.loads((out / "scene.geojson").read_text())
        assert json.loads((out / "summary.json").read_text())["per_scene"][0]["status"] == "done"
    window, whole = got["window"]["features"], got["whole"]["features"]
    assert len(window) == len(whole) > 100  # the 5 tiles with data, up to 100 boxes each
    boxes = lambda fc: np.array([f["properties"]["bbox_pixels"] for f in fc])  # noqa: E731
    np.testing.assert_allclose(boxes(window), boxes(whole), atol=1e-3, rtol=0)
    assert [f["properties"]["score"] for f in window] == [f["properties"]["score"] for f in whole]
    assert [f["properties"]["category_id"] for f in window] == [f["properties"]["category_id"] for f in whole]
    # Georeferenced as before: map coordinates and the CRS.
    assert got["window"]["crs"] == got["whole"]["crs"] and got["window"]["crs"]["properties"]["name"].endswith("32633")
    x0, y0, x1, y1 = window[0]["properties"]["bbox_pixels"]
    assert window[0]["geometry"]["coordinates"][0][2] == pytest.approx(list(TRANSFORM @ (x1, y1)))
    # No model run on the nodata tile: no box is centred in its core (x >= 198, y < 100).
    b = boxes(window)
    centre_x, centre_y = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    assert not ((centre_x >= 198) & (centre_y < 100)).any()


def test_predict_caps_gdal_block_cache_while_reading_and_restores_it(tmp_path, monkeypatch):
    """GDAL's default block cache (5% of RAM) would keep every block of a scene read by windows."""
    from rasterio._env import get_gdal_config
    from sdconet.inference.scene_reader import BLOCK_CACHE_BYTES

    predict = load_tool("predict")
    seen, original = [], predict.Predictor.predict_tiles

    def spy(self, images, score_thresh):
        seen.append(get_gdal_config("GDAL_CACHEMAX"))  # asked in the main thread, read in the reader's
        return original(self, images, score_thresh)

    monkeypatch.setattr(predict.Predictor, "predict_tiles", spy)
    before = get_gdal_config("GDAL_CACHEMAX")
    assert before != BLOCK_CACHE_BYTES
    path = write_geotiff(tmp_path / "scene.tif", rgb8())
    predict.main(["--config-file", TINY, "--weights", "", path, "--output", str(tmp_path / "out"), "--tile",
                  str(TILE), "--overlap", str(OVERLAP), "--device", "cpu", "--no-drawing"])
    assert len(seen) == 2 and set(seen) == {BLOCK_CACHE_BYTES}  # 6 tiles, batches of 4
    assert get_gdal_config("GDAL_CACHEMAX") == before
