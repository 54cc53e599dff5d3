"""Inference tools: tiling + merging, Predictor, GeoJSON of GeoTIFFs, tools/predict.py, ONNX export.

Nothing here needs a trained checkpoint: the merge is tested on what a perfect detector would
see in each tile, and the model paths run an untrained tiny model whose outputs are compared
between two routes (whole image vs tiles, PyTorch vs ONNX Runtime).
"""
import json
import os
import sys

import cv2
import numpy as np
import pytest
import rasterio
import sdconet
import torch
from affine import Affine
from common import REPO, TINY
from sdconet.data.synthetic import render_tile
from sdconet.inference.geo import detections_to_geojson, read_georeference
from sdconet.inference.tiling import merge_tile_detections, tile_grid, tile_starts
from torchvision.ops import batched_nms, box_iou

sys.path.insert(0, os.path.join(REPO, "tools"))

SCENE, TILE, OVERLAP = 2048, 512, 128
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)


# ---------------------------------------------------------------------------------- tiling
def test_tile_starts_cover_the_axis_and_end_at_the_border():
    assert tile_starts(2048, 512, 128) == [0, 384, 768, 1152, 1536]
    assert tile_starts(1000, 512, 128) == [0, 384, 488]  # last one shifted back to end at 1000
    assert tile_starts(300, 512, 128) == [0]
    tiles = tile_grid(300, 1000, 512, 128)
    assert {(t.y1 - t.y0, t.x1 - t.x0) for t in tiles} == {(300, 512)}
    covered = np.zeros((300, 1000), bool)
    for t in tiles:
        covered[t.y0:t.y1, t.x0:t.x1] = True
    assert covered.all()


def border_scene(seed=0):
    """GT boxes (xyxy) of a 2048^2 scene: objects straddling every tile cut and corner, plus random
    non-overlapping ones; all smaller than the overlap."""
    rng = np.random.default_rng(seed)
    starts = tile_starts(SCENE, TILE, OVERLAP)
    cuts = sorted(set(starts[1:]) | {s + TILE for s in starts[:-1]})  # inner tile edges
    boxes = []
    for cut in cuts:  # across vertical and horizontal cuts, at several positions along the cut
        for frac in (0.1, 0.5, 0.9):
            w, h = rng.uniform(8, 100, 2)
            along = rng.uniform(60, SCENE - 160)
            x0 = cut - frac * w
            boxes.append([x0, along, x0 + w, along + h])
            boxes.append([along, x0, along + h, x0 + w])
    for cx in cuts:  # across tile corners
        for cy in cuts[::2]:
            w, h = rng.uniform(10, 90, 2)
            f = rng.uniform(0.2, 0.8, 2)
            boxes.append([cx - f[0] * w, cy - f[1] * h, cx + (1 - f[0]) * w, cy + (1 - f[1]) * h])
    while len(boxes) < 300:
        w, h = rng.uniform(6, 120, 2)
        x0, y0 = rng.uniform(0, SCENE - w), rng.uniform(0, SCENE - h)
        boxes.append([x0, y0, x0 + w, y0 + h])
    boxes = torch.tensor(boxes, dtype=torch.float32)
    # Keep objects apart (a perfect detector separates them; overlapping GT would blur the test).
    keep = []
    for i in range(len(boxes)):
        if not keep or box_iou(boxes[i:i + 1], boxes[keep]).max() == 0:
            keep.append(i)
    boxes = boxes[keep]
    classes = torch.from_numpy(rng.integers(0, 4, len(boxes)))
    scores = torch.from_numpy(rng.uniform(0.3, 1.0, len(boxes))).float()
    return boxes, scores, classes


def perfect_tile_detections(boxes, scores, classes, tiles):
    """What a perfect detector reports in each tile: the visible part of every object, in tile pixels."""
    per_tile = []
    for t in tiles:
        clipped = boxes.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(t.x0, t.x1)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(t.y0, t.y1)
        visible = (clipped[:, 2] - clipped[:, 0] > 0.5) & (clipped[:, 3] - clipped[:, 1] > 0.5)
        shift = torch.tensor([t.x0, t.y0, t.x0, t.y0], dtype=torch.float32)
        per_tile.append((clipped[visible] - shift, scores[visible], classes[visible]))
    return per_tile


def test_merge_finds_each_border_object_once_and_matches_untiled():
    boxes, scores, classes = border_scene()
    tiles = tile_grid(SCENE, SCENE, TILE, OVERLAP)
    per_tile = perfect_tile_detections(boxes, scores, classes, tiles)
    cuts = {t.x0 for t in tiles} | {t.x1 for t in tiles}
    on_cut = [i for i, b in enumerate(boxes.tolist())
              if any(b[0] < c < b[2] or b[1] < c < b[3] for c in cuts - {0, SCENE})]
    assert len(on_cut) > 100  # the scene really exercises the tile borders
    assert sum(len(p[0]) for p in per_tile) > len(boxes) + len(on_cut)  # cut objects are seen several times

    merged_boxes, merged_scores, merged_classes = merge_tile_detections(per_tile, tiles, nms_iou=0.5)
    # Untiled result of the perfect detector = the GT itself.
    assert len(merged_boxes) == len(boxes)
    iou = box_iou(boxes, merged_boxes)
    best, match = iou.max(1)
    assert torch.unique(match).numel() == len(boxes)  # one-to-one
    assert (best > 0.999).all()
    torch.testing.assert_close(merged_boxes[match], boxes, atol=1e-3, rtol=0)
    assert torch.equal(merged_classes[match], classes)
    torch.testing.assert_close(merged_scores[match], scores)
    for i in on_cut:  # each border object exactly once (any overlap at all counts as a duplicate)
        assert int(((iou[i] > 0) & (merged_classes == classes[i])).sum()) == 1

    # The plain alternative (shift + class-wise NMS only) keeps cut pieces as duplicates here.
    shifted = torch.cat([b + torch.tensor([t.x0, t.y0, t.x0, t.y0]) for (b, _, _), t in zip(per_tile, tiles)])
    nms_only = batched_nms(shifted, torch.cat([p[1] for p in per_tile]), torch.cat([p[2] for p in per_tile]), 0.5)
    assert len(nms_only) > len(boxes)


def test_merge_of_objects_larger_than_overlap_falls_back_to_nms():
    tiles = tile_grid(1024, 1024, TILE, OVERLAP)  # cuts at 512 (tile 0) and 384 (tile 1), core border 448
    big = torch.tensor([[300.0, 100.0, 600.0, 200.0]])  # 300 px wide: no tile sees it whole
    per_tile = perfect_tile_detections(big, torch.tensor([0.9]), torch.tensor([1]), tiles)
    merged, _, _ = merge_tile_detections(per_tile, tiles, nms_iou=0.1)
    assert len(merged) == 1
    both, _, _ = merge_tile_detections(per_tile, tiles, nms_iou=None)
    assert len(both) == 2  # without NMS the two cut views (both crossing the core border) stay


# ---------------------------------------------------------------------------------- predictor
@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return sdconet.Predictor(TINY, weights=None, device="cpu")


def scene_image(height, width):
    """A synthetic aerial scene of any size, made of rendered 512 tiles."""
    tile, _ = render_tile(0, "test", 1, 512)
    reps = (-(-height // 512), -(-width // 512), 1)
    return np.ascontiguousarray(np.tile(tile, reps)[:height, :width])


def test_predict_large_on_an_image_smaller_than_a_tile_equals_call(predictor):
    image = scene_image(200, 320)
    direct = predictor(image)
    tiled = predictor.predict_large(image, tile=512, overlap=128)
    assert len(direct) == predictor.cfg.MODEL.SDCONET.TRANSFORMER.NUM_DETECTIONS
    assert tiled.image_size == direct.image_size == (200, 320)
    assert torch.equal(tiled.pred_boxes.tensor, direct.pred_boxes.tensor)
    assert torch.equal(tiled.scores, direct.scores)
    assert torch.equal(tiled.pred_classes, direct.pred_classes)


def test_predict_large_runs_on_a_2048_scene_with_boxes_inside(predictor):
    image = scene_image(SCENE, SCENE)
    result = predictor.predict_large(image, tile=TILE, overlap=OVERLAP, batch=4)
    boxes = result.pred_boxes.tensor
    assert result.image_size == (SCENE, SCENE)
    assert 25 <= len(result) <= 25 * 100  # 5 x 5 tiles of at most 100 detections
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= SCENE).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    assert boxes[:, 0].max() > 1536 and boxes[:, 1].max() > 1536  # the last tiles' boxes came back shifted
    # Detections of the first tile's core equal those of the model on that crop alone.
    core = 448  # middle of the first overlap
    direct = predictor(image[:TILE, :TILE]).pred_boxes.tensor
    inside = lambda b: (b[:, 2] <= core) & (b[:, 3] <= core)  # noqa: E731
    torch.testing.assert_close(boxes[inside(boxes)].sort(0).values, direct[inside(direct)].sort(0).values,
                               atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------- GeoJSON
def write_geotiff(path, image_bgr):
    h, w = image_bgr.shape[:2]
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=TRANSFORM) as dst:
        dst.write(image_bgr[:, :, ::-1].transpose(2, 0, 1))


def test_geojson_of_a_geotiff_has_the_expected_map_coordinates(tmp_path):
    path = str(tmp_path / "scene.tif")
    write_geotiff(path, scene_image(64, 96))
    transform, crs = read_georeference(path)
    assert crs.to_epsg() == 32633
    boxes = np.array([[0.0, 0.0, 10.0, 20.0], [40.5, 12.0, 96.0, 64.0]])
    fc = detections_to_geojson(boxes, [0.9, 0.4], [2, 0], ["vehicle", "ship", "plane", "storage-tank"],
                               transform, crs, image_file=path)
    assert fc["crs"]["properties"]["name"].endswith("EPSG::32633")
    ring = fc["features"][0]["geometry"]["coordinates"][0]
    assert ring == [[500000.0, 4000000.0], [500005.0, 4000000.0], [500005.0, 3999990.0],
                    [500000.0, 3999990.0], [500000.0, 4000000.0]]
    ring = fc["features"][1]["geometry"]["coordinates"][0]
    assert ring[0] == [500020.25, 3999994.0] and ring[2] == [500048.0, 3999968.0]
    assert fc["features"][0]["properties"]["category"] == "plane"
    assert fc["features"][1]["properties"]["score"] == 0.4

    png = str(tmp_path / "plain.png")
    cv2.imwrite(png, scene_image(32, 32))
    assert read_georeference(png) is None
    plain = detections_to_geojson(boxes, [0.9, 0.4], [2, 0], ["a", "b", "c", "d"])
    assert plain["properties"]["coordinates"] == "pixel" and "crs" not in plain
    assert plain["features"][1]["geometry"]["coordinates"][0][2] == [96.0, 64.0]


def test_predict_tool_end_to_end_on_a_png_and_a_geotiff(tmp_path):
    import predict

    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "plain.png"), scene_image(160, 224))
    write_geotiff(str(folder / "geo.tif"), scene_image(256, 192))
    out = tmp_path / "out"
    torch.manual_seed(0)
    predict.main(["--config-file", TINY, "--weights", "", str(folder), "--output", str(out), "--tile", "128",
                  "--overlap", "32", "--score-thresh", "0", "--device", "cpu"])
    results = json.loads((out / "results.json").read_text())
    assert {os.path.basename(r["file_name"]) for r in results} == {"plain.png", "geo.tif"}
    for name in ("plain", "geo"):
        assert cv2.imread(str(out / f"{name}.png")) is not None
    fc = json.loads((out / "geo.geojson").read_text())
    assert fc["crs"]["properties"]["name"].endswith("EPSG::32633") and fc["properties"]["coordinates"] == "map"
    geo_results = [r for r in results if r["file_name"].endswith("geo.tif")]
    assert len(fc["features"]) == len(geo_results) > 0
    for feature, r in zip(fc["features"], geo_results):
        x, y, w, h = r["bbox"]
        ring = np.array(feature["geometry"]["coordinates"][0])
        expected = np.array([TRANSFORM @ c for c in [(x, y), (x + w, y), (x + w, y + h), (x, y + h), (x, y)]])
        np.testing.assert_allclose(ring, expected, atol=0.01)  # bbox is rounded to 0.01 px
        assert 500000 <= ring[:, 0].min() and ring[:, 0].max() <= 500000 + 0.5 * 192
        assert 4000000 - 0.5 * 256 <= ring[:, 1].min() and ring[:, 1].max() <= 4000000
    plain = json.loads((out / "plain.geojson").read_text())
    assert plain["properties"]["coordinates"] == "pixel" and "crs" not in plain


# ---------------------------------------------------------------------------------- ONNX
def test_onnx_export_matches_pytorch(predictor, tmp_path):
    from sdconet.inference.export import compare, decode_detections, export_onnx, normalise, run_pytorch

    model = predictor.model
    assert model.input_scale == 2  # HR 128 x 128 in, degraded inside the graph
    path = export_onnx(model, str(tmp_path / "tiny.onnx"), 128, 128)
    image, _ = render_tile(0, "test", 2, 128)
    tensor = normalise(model, image)
    diffs = compare(model, path, tensor)
    print("ONNX max diffs:", diffs)
    assert diffs["matched"] >= model.num_detections - 2  # at most a near-tie swapped at the top-k border
    assert diffs["boxes_px"] < 1e-3 and diffs["scores"] < 1e-4

    # The exported path is the model's own inference path: same detections as model(batched_inputs).
    decoded = decode_detections(*run_pytorch(model, tensor), 128, 128, model.num_detections)[0]
    direct = predictor(image)
    torch.testing.assert_close(decoded["boxes"], direct.pred_boxes.tensor, atol=1e-4, rtol=0)
    torch.testing.assert_close(decoded["scores"], direct.scores)
    assert torch.equal(decoded["classes"], direct.pred_classes)


def test_predictor_on_a_paper_config_needs_only_the_trained_checkpoint(tmp_path, monkeypatch):
    """A trained checkpoint replaces the backbone anyway: no ImageNet Swin file is asked for."""
    from detectron2.modeling import build_model
    monkeypatch.delenv("SDCONET_WEIGHTS", raising=False)
    config = str(REPO / "configs" / "Baselines" / "dino_swin-t_lr_nwpu.yaml")
    cpu = ["MODEL.DEVICE", "cpu"]
    with pytest.raises(FileNotFoundError, match="no ImageNet weights"):
        sdconet.Predictor(config, None, device="cpu", opts=cpu)
    trained = build_model(sdconet.get_sdconet_cfg(config, [*cpu, "MODEL.SDCONET.SWIN.PRETRAINED", "none"]))
    torch.save({"model": trained.state_dict()}, tmp_path / "w.pth")
    predictor = sdconet.Predictor(config, str(tmp_path / "w.pth"), device="cpu", opts=cpu)
    loaded = dict(predictor.model.named_parameters())
    key = next(k for k in loaded if k.startswith("backbone.") and k.endswith("qkv.weight"))
    assert torch.equal(loaded[key], trained.state_dict()[key])  # the checkpoint's random Swin, not a new one
