"""tools/benchmark_scene.py: the generated GeoTIFF scene and one small run of each measurement.

The figures themselves (throughput, peak RSS) are the tool's output for BENCHMARKS.md, not asserted
here; what is asserted is that each run measured what it says: the pipeline ran predict.py's path over
the whole tile grid and found what predict.py finds, and SAHI cut the scene into the same slices.
"""
import importlib.util
import json

import cv2
import numpy as np
import pytest
import rasterio
import torch
from common import TINY, load_tool
from sdconet.data.synthetic import render_tile
from sdconet.inference import Predictor
from sdconet.inference.tiling import tile_grid

benchmark_scene = load_tool("benchmark_scene")
predict = load_tool("predict")

SIZE, TILE, OVERLAP = 600, 256, 64  # tiles start at 0, 192, 344: a 3 x 3 grid


def test_scene_is_a_tiled_georeferenced_rgb_geotiff_of_rendered_tiles(tmp_path):
    path = benchmark_scene.write_scene(str(tmp_path / "scene.tif"), 700)
    with rasterio.open(path) as src:
        assert (src.width, src.height, src.count, src.dtypes[0]) == (700, 700, 3, "uint8")
        assert src.crs.to_epsg() == 32633 and src.transform.a == 0.5
        assert src.block_shapes[0] == (512, 512) and src.compression.name.lower() == "deflate"
        data = src.read()
    assert not list(tmp_path.glob("*.partial*"))
    tiles = benchmark_scene.scene_tiles()
    hr = render_tile(0, "test", 1, 1024)[0]  # tile 1: HR 1024 px, area-downsampled to 512, R, G, B
    np.testing.assert_array_equal(tiles[1], cv2.resize(hr, (512, 512), interpolation=cv2.INTER_AREA)[:, :, ::-1]
                                  .transpose(2, 0, 1))
    rgb = [tiles[i] for i in (0, 1, 5)]
    np.testing.assert_array_equal(data[:, :512, :512], rgb[0])
    np.testing.assert_array_equal(data[:, :512, 512:], rgb[1][:, :, :188])  # cut at the scene's right border
    np.testing.assert_array_equal(data[:, 512:, :512], rgb[2][:, :188])  # the next row of blocks is shifted by 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("benchmark_scene")
    out, weights = tmp / "result.json", tmp / "weights.pth"
    torch.manual_seed(0)
    torch.save({"model": Predictor(TINY).model.state_dict()}, weights)  # the same weights in every process
    sahi = ["--sahi"] if importlib.util.find_spec("sahi") else []
    benchmark_scene.main(["--config-file", TINY, "--weights", str(weights), "--sizes", str(SIZE),
                          "--scene-dir", str(tmp), "--threads", "1", "--tile", str(TILE), "--overlap", str(OVERLAP),
                          "--batch", "2", "--model-tiles", "4", "--score-thresh", "0", "--json", str(out), *sahi])
    return tmp, weights, json.loads(out.read_text())


def test_model_only_run_times_the_tiles_it_was_asked_for(runs):
    _, _, result = runs
    model = result["scenes"][str(SIZE)]["model"]
    assert model["tiles"] == 4 and model["seconds"] > 0
    assert model["tiles_per_s"] == pytest.approx(4 / model["seconds"])


def test_pipeline_run_covers_the_grid_and_finds_what_predict_finds(runs):
    tmp, weights, result = runs
    pipeline, no_drawing = result["scenes"][str(SIZE)]["pipeline"], result["scenes"][str(SIZE)]["pipeline_no_drawing"]
    assert pipeline["tiles"] == no_drawing["tiles"] == len(tile_grid(SIZE, SIZE, TILE, OVERLAP)) == 9
    assert pipeline["peak_rss_mib"] >= pipeline["peak_rss_before_mib"] > 0
    assert no_drawing["detections"] == pipeline["detections"]
    out = tmp / "predict"
    predict.main(["--config-file", TINY, "--weights", str(weights), str(tmp / f"scene_{SIZE}.tif"),
                  "--output", str(out), "--tile", str(TILE), "--overlap", str(OVERLAP), "--batch", "2",
                  "--score-thresh", "0"])
    features = json.loads((out / f"scene_{SIZE}.geojson").read_text())["features"]
    assert pipeline["detections"] == len(features) > 0


def test_report_has_the_command_and_one_row_per_run(runs):
    _, _, result = runs
    table = benchmark_scene.format_table(result)
    assert result["command"].startswith("python tools/benchmark_scene.py --config-file")
    assert len(table.splitlines()) == 2 + len(result["scenes"][str(SIZE)])
    assert "| 600² | model | 4 |" in table and "| 100% |" in table


@pytest.mark.skipif(importlib.util.find_spec("sahi") is None, reason="SAHI comes with the benchmark extra only")
def test_sahi_run_cuts_the_same_slices(runs):
    _, _, result = runs
    sahi = result["scenes"][str(SIZE)]["sahi"]
    assert sahi["tiles"] == 9 and sahi["detections"] > 0


def test_sahi_without_the_extra_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sahi" else real(name, *a))
    with pytest.raises(SystemExit, match=r"pip install -e \.\[benchmark\]"):
        benchmark_scene.main(["--sizes", "64", "--sahi"])
