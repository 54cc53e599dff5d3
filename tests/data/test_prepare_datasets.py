"""Dataset preparation: raw NWPU VHR-10 / DOTA / HRRSD fixtures -> tiles + COCO json.

Each fixture is written in the real raw format, the prepare script's ``main(argv)`` is
run in-process, and tiles, padding, boxes and class ids are checked exactly. Tile 256
with overlap 0 or 32 keeps the arithmetic exact.
"""

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from common import REPO
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from pycocotools.coco import COCO
from sdconet.data.formats.coco_json import summarize
from sdconet.data.formats.tiling import assign_boxes, tile_grid, tile_origins
from sdconet.data.metadata import DOTA15_CLASSES, HRSSD_CLASSES, NWPU_VHR10_CLASSES


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"prepare_script_{name}", REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_image(width, height, seed):
    """Random textured image with no zero pixel, so zero padding is unambiguous."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 216, size=(height, width, 3), dtype=np.uint8)


def write_image(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def read_split(root, split):
    """(COCO dict, {file_name: sorted [(category_id, bbox)]}, tile files) of one output split."""
    json_path = root / split / "annotations" / f"instances_{split}.json"
    coco = json.loads(json_path.read_text())
    COCO(str(json_path))  # must load with the reference API
    names = {img["id"]: img["file_name"] for img in coco["images"]}
    boxes = {name: [] for name in names.values()}
    for ann in coco["annotations"]:
        boxes[names[ann["image_id"]]].append((ann["category_id"], [round(v, 3) for v in ann["bbox"]]))
    boxes = {k: sorted(v) for k, v in boxes.items()}
    files = sorted(p.name for p in (root / split / "images").iterdir())
    return coco, boxes, files


def xyxy(x1, y1, x2, y2):
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


def tile_names(stem, xs, ys):
    return sorted(f"{stem}_{x}_{y}.png" for y in ys for x in xs)


def check_tile_pixels(tile_path, source, x0, y0, tile):
    """The tile is the source crop, zero outside the source image."""
    got = cv2.imread(str(tile_path), cv2.IMREAD_UNCHANGED)
    assert got.shape == (tile, tile, 3)
    inside_h = min(tile, source.shape[0] - y0)
    inside_w = min(tile, source.shape[1] - x0)
    np.testing.assert_array_equal(got[:inside_h, :inside_w], source[y0:y0 + inside_h, x0:x0 + inside_w])
    assert (got[inside_h:] == 0).all() and (got[:, inside_w:] == 0).all()
    assert inside_h < tile or inside_w < tile  # callers pass border tiles: padding was checked


# ------------------------------------------------------------------------------- unit level

def test_tile_grid_covers_image_with_padding_at_the_border():
    assert tile_origins(700, 256, 0) == [0, 256, 512]
    assert tile_origins(700, 256, 32) == [0, 224, 448]
    assert tile_origins(256, 256, 0) == [0]
    assert tile_origins(257, 256, 0) == [0, 256]
    assert tile_origins(10, 256, 64) == [0]
    assert len(tile_grid(700, 600, 256, 0)) == 9
    with pytest.raises(ValueError):
        tile_origins(100, 256, 256)


def test_scripts_have_help():
    for name in ("prepare_nwpu_vhr10", "prepare_dota", "prepare_hrssd"):
        with pytest.raises(SystemExit) as exit_info:
            load_script(name).main(["--help"])
        assert exit_info.value.code == 0


def test_assign_boxes_visible_fraction_and_min_side():
    boxes = np.array([[186, 0, 286, 10],   # 70 % inside tile [0, 256): kept, clipped
                      [187, 0, 287, 10],   # 69 % inside: dropped
                      [255.5, 0, 300, 10],  # clipped width 0.5 px: dropped
                      [10, 10, 20, 20]])
    kept, labels = assign_boxes(boxes, [0, 1, 2, 3], 0, 0, 256, min_visible=0.7)
    np.testing.assert_allclose(kept, [[186, 0, 256, 10], [10, 10, 20, 20]])
    assert labels.tolist() == [0, 3]
    kept, labels = assign_boxes(boxes, [0, 1, 2, 3], 256, 0, 256, min_visible=0.0)
    np.testing.assert_allclose(kept, [[0, 0, 30, 10], [0, 0, 31, 10], [0, 0, 44, 10]])


# ------------------------------------------------------------------------------- NWPU VHR-10

def make_nwpu_original(root):
    big, tiny, negative = make_image(700, 600, 1), make_image(200, 150, 2), make_image(300, 280, 3)
    write_image(root / "positive image set" / "001.jpg", big)
    write_image(root / "positive image set" / "002.jpg", tiny)
    write_image(root / "negative image set" / "001.jpg", negative)
    gt = root / "ground truth"
    gt.mkdir()
    (gt / "001.txt").write_text(
        "(10,20),(60,70),1\n"
        "(216,100),(266,140),2\n"     # 80 % left of x=256: kept there, dropped right
        "\n"
        "(400,236),(440,276),10\n"    # 50/50 across y=256: dropped everywhere
        "(600,520),(690,590),4\n"     # in the padded corner tile
        "(186,300),(286,340),5\n"     # exactly 70 % left of x=256: kept
        "(300, 400), (330, 430), 9\n"
        "\n")
    (gt / "002.txt").write_text("(5,5),(25,45),3\n")
    return big


NWPU_EXPECTED = {
    "001_0_0.png": [(1, xyxy(10, 20, 60, 70)), (2, xyxy(216, 100, 256, 140))],
    "001_0_256.png": [(5, xyxy(186, 44, 256, 84))],
    "001_256_256.png": [(9, xyxy(44, 144, 74, 174))],
    "001_512_512.png": [(4, xyxy(88, 8, 178, 78))],
    "002_0_0.png": [(3, xyxy(5, 5, 25, 45))],
}


def test_prepare_nwpu_original_release(tmp_path, capsys):
    big = make_nwpu_original(tmp_path / "raw")
    script = load_script("prepare_nwpu_vhr10")
    out = tmp_path / "out"
    script.main(["--src", str(tmp_path / "raw"), "--out", str(out), "--tile", "256", "--overlap", "0"])
    root = out / "NWPU_VHR10_Split"

    all_files, all_boxes = [], {}
    sources_per_split = {}
    for split in ("train", "test"):
        coco, boxes, files = read_split(root, split)
        assert [c["name"] for c in coco["categories"]] == list(NWPU_VHR10_CLASSES)
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert sorted(img["file_name"] for img in coco["images"]) == files
        assert all(img["width"] == img["height"] == 256 for img in coco["images"])
        all_files += files
        all_boxes.update(boxes)
        sources_per_split[split] = {f.rsplit("_", 2)[0] for f in files}
    # Split by source image: 3 sources, round(0.3 * 3) = 1 in test, none in both.
    assert len(sources_per_split["test"]) == 1 and len(sources_per_split["train"]) == 2
    assert not sources_per_split["train"] & sources_per_split["test"]

    expected_files = (tile_names("001", [0, 256, 512], [0, 256, 512]) + ["002_0_0.png"]
                      + tile_names("negative_001", [0, 256], [0, 256]))
    assert sorted(all_files) == sorted(expected_files)
    assert {k: v for k, v in all_boxes.items() if v} == NWPU_EXPECTED

    split_of_001 = "train" if "001" in sources_per_split["train"] else "test"
    source = cv2.imread(str(tmp_path / "raw" / "positive image set" / "001.jpg"))
    assert source.shape == big.shape
    check_tile_pixels(root / split_of_001 / "images" / "001_512_512.png", source, 512, 512, 256)
    check_tile_pixels(root / split_of_001 / "images" / "001_512_0.png", source, 512, 0, 256)

    printed = capsys.readouterr().out
    assert "NWPU_VHR10_Split / train" in printed and "objects per size band" in printed

    # Same seed -> byte-identical json; existing output is refused without --overwrite.
    with pytest.raises(FileExistsError):
        script.main(["--src", str(tmp_path / "raw"), "--out", str(out), "--tile", "256", "--overlap", "0"])
    out2 = tmp_path / "out2"
    script.main(["--src", str(tmp_path / "raw"), "--out", str(out2), "--tile", "256", "--overlap", "0"])
    for split in ("train", "test"):
        rel = Path("NWPU_VHR10_Split") / split / "annotations" / f"instances_{split}.json"
        assert (out / rel).read_bytes() == (out2 / rel).read_bytes()


def test_prepare_nwpu_coco_rerelease(tmp_path, monkeypatch):
    raw = tmp_path / "NWPU VHR-10_dataset_coco"
    write_image(raw / "positive image set" / "003.jpg", make_image(300, 280, 4))
    # Category ids deliberately not in our order: mapping must go by name.
    coco = dict(
        images=[dict(id=0, file_name="003.jpg", width=300, height=280)],
        categories=[dict(id=1, name="vehicle"), dict(id=2, name="storage_tank")],
        annotations=[
            dict(id=1, image_id=0, category_id=2, bbox=[20, 30, 40, 50], iscrowd=0, area=2000),
            dict(id=2, image_id=0, category_id=1, bbox=[250, 260, 20, 15], iscrowd=0, area=300),  # 4 tiles share it
        ])
    (raw / "annotations.json").write_text(json.dumps(coco))
    monkeypatch.setenv("SDCONET_DATASETS", str(tmp_path / "env_out"))  # default --out
    load_script("prepare_nwpu_vhr10").main(
        ["--src", str(raw), "--tile", "256", "--overlap", "0", "--test-fraction", "0"])
    root = tmp_path / "env_out" / "NWPU_VHR10_Split"
    _, boxes, files = read_split(root, "train")
    assert files == tile_names("003", [0, 256], [0, 256])
    # Vehicle [250,260]-[270,275] straddles x=256 (30 % / 70 %) and y=256 (entirely below).
    assert boxes == {"003_0_0.png": [(3, xyxy(20, 30, 60, 80))], "003_256_0.png": [],
                     "003_0_256.png": [], "003_256_256.png": [(10, xyxy(0, 4, 14, 19))]}
    test_coco, _, test_files = read_split(root, "test")
    assert test_files == [] and test_coco["images"] == []


# ------------------------------------------------------------------------------- DOTA

def make_dota(root):
    big, tiny, val = make_image(700, 600, 5), make_image(200, 150, 6), make_image(300, 300, 7)
    write_image(root / "train" / "images" / "P0001.png", big)
    write_image(root / "train" / "images" / "P0002.png", tiny)
    write_image(root / "val" / "images" / "P0003.png", val)
    (root / "train" / "labelTxt").mkdir(parents=True)
    (root / "val" / "labelTxt").mkdir(parents=True)
    (root / "train" / "labelTxt" / "P0001.txt").write_text(
        "imagesource:GoogleEarth\n"
        "gsd:0.146343590398\n"
        "230 10 250 10 250 40 230 40 plane 0\n"                  # in the overlap of two tiles
        "100 150 130 120 160 150 130 180 small-vehicle 1\n"      # rotated, difficult
        "460 300 500 300 500 340 460 340 harbor 0\n"             # 50 % in tile x0=224: dropped there
        "450 250 490 250 490 270 450 270 container-crane 0\n"    # 75 % in tile x0=224, whole in x0=448
        "300 100 305 100 305 105 300 105 storage-tank 0\n"       # < 8 px
        "20 300 150 300 150 440 20 440 ground-track-field 0\n")  # > 96 px
    (root / "train" / "labelTxt" / "P0002.txt").write_text(
        "10 10 50 10 50 30 10 30 ship 0\n"
        "60 60 80 60 80 90 60 90 helicopter\n")                  # no difficult field
    (root / "val" / "labelTxt" / "P0003.txt").write_text(
        "imagesource:GF2\ngsd:null\n20 20 40 20 40 40 20 40 roundabout 0\n")
    return big


def cat(name):
    return DOTA15_CLASSES.index(name) + 1


DOTA_TRAIN_EXPECTED = {
    "P0001_0_0.png": sorted([(cat("plane"), xyxy(230, 10, 250, 40)),
                             (cat("small-vehicle"), xyxy(100, 120, 160, 180))]),
    "P0001_224_0.png": sorted([(cat("plane"), xyxy(6, 10, 26, 40)),
                               (cat("storage-tank"), xyxy(76, 100, 81, 105))]),
    "P0001_224_224.png": [(cat("container-crane"), xyxy(226, 26, 256, 46))],
    "P0001_448_224.png": sorted([(cat("harbor"), xyxy(12, 76, 52, 116)),
                                 (cat("container-crane"), xyxy(2, 26, 42, 46))]),
    "P0001_0_224.png": [(cat("ground-track-field"), xyxy(20, 76, 150, 216))],
    "P0002_0_0.png": sorted([(cat("ship"), xyxy(10, 10, 50, 30)), (cat("helicopter"), xyxy(60, 60, 80, 90))]),
}


def test_prepare_dota(tmp_path):
    big = make_dota(tmp_path / "raw")
    script = load_script("prepare_dota")
    out = tmp_path / "out"
    script.main(["--src", str(tmp_path / "raw"), "--out", str(out), "--tile", "256", "--overlap", "32"])
    root = out / "DOTAv1.5_Split"

    coco, boxes, files = read_split(root, "train")
    assert files == sorted(tile_names("P0001", [0, 224, 448], [0, 224, 448]) + ["P0002_0_0.png"])
    assert {k: v for k, v in boxes.items() if v} == DOTA_TRAIN_EXPECTED
    assert [c["name"] for c in coco["categories"]] == list(DOTA15_CLASSES)
    stats = summarize(coco, DOTA15_CLASSES)
    assert stats["images"] == 10 and stats["empty_images"] == 4 and stats["objects"] == 10
    assert stats["per_size_band"] == {"<8": 1, "8-16": 0, "16-32": 6, "32-96": 2, ">96": 1}
    assert stats["per_class"]["plane"] == 2 and stats["per_class"]["container-crane"] == 2
    check_tile_pixels(root / "train" / "images" / "P0001_448_448.png", big, 448, 448, 256)
    check_tile_pixels(root / "train" / "images" / "P0002_0_0.png", make_image(200, 150, 6), 0, 0, 256)

    _, test_boxes, test_files = read_split(root, "test")
    assert test_files == tile_names("P0003", [0, 224], [0, 224])
    assert {k: v for k, v in test_boxes.items() if v} == {"P0003_0_0.png": [(cat("roundabout"), xyxy(20, 20, 40, 40))]}

    # --skip-difficult drops the small vehicle; --skip-empty keeps only tiles with objects.
    out2 = tmp_path / "out2"
    script.main(["--src", str(tmp_path / "raw"), "--out", str(out2), "--tile", "256", "--overlap", "32",
                 "--skip-difficult", "--skip-empty"])
    _, boxes2, files2 = read_split(out2 / "DOTAv1.5_Split", "train")
    expected2 = dict(DOTA_TRAIN_EXPECTED, **{"P0001_0_0.png": [(cat("plane"), xyxy(230, 10, 250, 40))]})
    assert files2 == sorted(expected2) and boxes2 == expected2
    assert read_split(out2 / "DOTAv1.5_Split", "test")[2] == ["P0003_0_0.png"]


def test_dota_unknown_class_and_missing_image_are_named(tmp_path):
    make_dota(tmp_path / "raw")
    label = tmp_path / "raw" / "val" / "labelTxt" / "P0003.txt"
    label.write_text("1 1 5 1 5 5 1 5 windmill 0\n")
    script = load_script("prepare_dota")
    argv = ["--src", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--tile", "256"]
    with pytest.raises(ValueError, match=r"P0003\.txt.*'windmill'"):
        script.main(argv)
    label.write_text("1 1 5 1 5 5 1 5 plane 0\n")
    (tmp_path / "raw" / "val" / "images" / "P0003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"P0003\.png"):
        script.main(argv)
    assert not (tmp_path / "out").exists()  # failed before writing anything


# ------------------------------------------------------------------------------- HRRSD (VOC XML)

def voc_xml(filename, width, height, objects):
    body = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for name, b in objects)
    return (f"<annotation><folder>OPT2017</folder><filename>{filename}</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{body}</annotation>")


def make_hrrsd(root, with_image_sets=True):
    voc = root / "OPT2017"
    images = {"00001": make_image(700, 600, 8), "00002": make_image(200, 150, 9), "00003": make_image(300, 280, 10)}
    for stem, image in images.items():
        write_image(voc / "JPEGImages" / f"{stem}.jpg", image)
    (voc / "Annotations").mkdir(parents=True)
    # VOC corners are 1-based: xmin 11 -> x 10.
    (voc / "Annotations" / "00001.xml").write_text(voc_xml("00001.jpg", 700, 600, [
        ("T junction", (11, 21, 60, 70)),
        ("ground_track_field", (201, 201, 300, 250)),  # 56 % / 44 % across x=256: dropped
        ("Parking-Lot", (227, 301, 266, 340)),         # 75 % left of x=256: kept
        ("crossroad", (601, 521, 690, 590)),           # padded corner tile
    ]))
    (voc / "Annotations" / "00002.xml").write_text(voc_xml("00002.jpg", 200, 150, [("vehicle", (6, 6, 25, 45))]))
    (voc / "Annotations" / "00003.xml").write_text(voc_xml("00003.jpg", 300, 280, []))
    if with_image_sets:
        sets = voc / "ImageSets" / "Main"
        sets.mkdir(parents=True)
        (sets / "train.txt").write_text("00001\n")
        (sets / "val.txt").write_text("00003\n")
        (sets / "test.txt").write_text("00002\n")
        (sets / "airplane_train.txt").write_text("00001 -1\n")  # per-class lists are ignored
    return images


def hcat(name):
    return HRSSD_CLASSES.index(name) + 1


def test_prepare_hrssd_with_image_sets(tmp_path):
    images = make_hrrsd(tmp_path / "HRRSD")
    out = tmp_path / "out"
    load_script("prepare_hrssd").main(["--src", str(tmp_path / "HRRSD"), "--out", str(out),
                                       "--tile", "256", "--overlap", "0"])
    root = out / "HRSSD_Split"
    coco, boxes, files = read_split(root, "train")  # train + val
    assert files == sorted(tile_names("00001", [0, 256, 512], [0, 256, 512])
                           + tile_names("00003", [0, 256], [0, 256]))
    assert {k: v for k, v in boxes.items() if v} == {
        "00001_0_0.png": [(hcat("T junction"), xyxy(10, 20, 60, 70))],
        "00001_0_256.png": [(hcat("parking lot"), xyxy(226, 44, 256, 84))],
        "00001_512_512.png": [(hcat("crossroad"), xyxy(88, 8, 178, 78))],
    }
    assert [c["name"] for c in coco["categories"]] == list(HRSSD_CLASSES)
    _, test_boxes, test_files = read_split(root, "test")
    assert test_files == ["00002_0_0.png"]
    assert test_boxes == {"00002_0_0.png": [(hcat("vehicle"), xyxy(5, 5, 25, 45))]}
    source = cv2.imread(str(tmp_path / "HRRSD" / "OPT2017" / "JPEGImages" / "00002.jpg"))
    assert source.shape == images["00002"].shape
    check_tile_pixels(root / "test" / "images" / "00002_0_0.png", source, 0, 0, 256)

    # detectron2 reads the layout: image paths resolve and boxes come back in XYWH_ABS.
    records = load_coco_json(str(root / "test" / "annotations" / "instances_test.json"), str(root / "test" / "images"))
    assert [Path(r["file_name"]).is_file() for r in records] == [True]
    assert records[0]["annotations"][0]["bbox"] == xyxy(5, 5, 25, 45)
    assert records[0]["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS


def test_prepare_hrssd_seeded_split_and_errors(tmp_path):
    make_hrrsd(tmp_path / "HRRSD", with_image_sets=False)
    script = load_script("prepare_hrssd")
    out = tmp_path / "out"
    script.main(["--src", str(tmp_path / "HRRSD" / "OPT2017"), "--out", str(out), "--tile", "256",
                 "--overlap", "0", "--test-fraction", "0.34", "--seed", "3"])
    stems = {split: {f.rsplit("_", 2)[0] for f in read_split(out / "HRSSD_Split", split)[2]}
             for split in ("train", "test")}
    assert len(stems["test"]) == 1 and len(stems["train"]) == 2  # round(0.34 * 3) = 1
    assert stems["train"] | stems["test"] == {"00001", "00002", "00003"}

    xml = tmp_path / "HRRSD" / "OPT2017" / "Annotations" / "00002.xml"
    xml.write_text(voc_xml("00002.jpg", 200, 150, [("windmill", (6, 6, 25, 45))]))
    with pytest.raises(ValueError, match=r"00002\.xml.*'windmill'"):
        script.main(["--src", str(tmp_path / "HRRSD"), "--out", str(tmp_path / "out2")])
    xml.write_text(voc_xml("00002.jpg", 200, 150, []))
    (tmp_path / "HRRSD" / "OPT2017" / "JPEGImages" / "00002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"00002\.jpg"):
        script.main(["--src", str(tmp_path / "HRRSD"), "--out", str(tmp_path / "out3"), "--tile", "256"])


@pytest.mark.parametrize("script_name, key, make", [
    ("prepare_nwpu_vhr10", "nwpu_vhr10_split", lambda p: make_nwpu_original(p)),
    ("prepare_dota", "dota15_split", lambda p: make_dota(p)),
    ("prepare_hrssd", "hrssd_split", lambda p: make_hrrsd(p)),
])
def test_prepared_output_loads_through_dataset_catalog(tmp_path, script_name, key, make):
    """The registered names read what the prepare scripts write, with contiguous class ids."""
    from detectron2.data import DatasetCatalog
    from sdconet.data.datasets import DATASETS, datasets_root, register_sdconet_datasets

    make(tmp_path / "raw")
    load_script(script_name).main(["--src", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                                   "--tile", "256", "--overlap", "0"])
    register_sdconet_datasets(str(tmp_path / "out"))
    try:
        for split in ("train", "test"):
            coco, _, files = read_split(tmp_path / "out" / DATASETS[key].folder, split)
            records = DatasetCatalog.get(f"{key}_{split}")
            assert sorted(Path(r["file_name"]).name for r in records) == files
            assert all(Path(r["file_name"]).is_file() for r in records)
            got = sorted(a["category_id"] for r in records for a in r["annotations"])
            assert got == sorted(a["category_id"] - 1 for a in coco["annotations"])
    finally:
        register_sdconet_datasets(datasets_root())
