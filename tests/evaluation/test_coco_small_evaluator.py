"""SmallObjectCOCOEvaluator: AI-TOD size bands, AR, detection cap, per-class AP, both COCO backends.

Expected numbers are worked out by hand from COCO's rules: AP is the mean, over the 101
recall thresholds 0, 0.01, ..., 1, of the best precision reached at recall >= threshold
(0 where the recall is never reached); with exact boxes IoU = 1, so all ten IoU thresholds agree.
"""
import json
import math
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from sdconet.evaluation.coco_small import SmallObjectCOCOEvaluator, max_dets_thresholds

CLASSES = ("car", "ship")
BACKENDS = ("faster", "pycocotools")


@pytest.fixture
def register_coco(tmp_path):
    """Write a COCO json and register its metadata under a fresh name; removed afterwards."""
    names = []

    def register(images, annotations):
        name = f"coco_small_test_{uuid.uuid4().hex[:8]}"
        path = tmp_path / f"{name}.json"
        for index, ann in enumerate(annotations, start=1):
            ann.update(id=index, iscrowd=0, area=ann["bbox"][2] * ann["bbox"][3])
        path.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}))
        MetadataCatalog.get(name).set(json_file=str(path), thing_classes=list(CLASSES),
                                      thing_dataset_id_to_contiguous_id={1: 0, 2: 1})
        names.append(name)
        return name

    yield register
    for name in names:
        MetadataCatalog.remove(name)


def xywh_to_xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def make_output(boxes_xyxy, scores, classes, size=(200, 200)):
    instances = Instances(size)
    instances.pred_boxes = Boxes(torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.tensor(scores, dtype=torch.float32)
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    return {"instances": instances}


def evaluate(evaluator, per_image):
    """per_image: list of (image_id, output dict)."""
    evaluator.reset()
    for image_id, output in per_image:
        evaluator.process([{"image_id": image_id}], [output])
    return evaluator.evaluate()["bbox"]


# One 200x200 image. car GTs: one very tiny (6 px), two tiny (12 px), one 16-32 px (24 px), one
# COCO-medium (48 px); ship: one tiny (12 px). Sides avoid band edges (edges are inclusive).
CAR_VT, CAR_T1, CAR_T2 = [10, 10, 6, 6], [40, 10, 12, 12], [70, 10, 12, 12]
CAR_S, CAR_M = [10, 60, 24, 24], [100, 60, 48, 48]
SHIP_T = [150, 150, 12, 12]
CAR_FALSE_POSITIVE = [10, 150, 34, 174]  # 24x24 car box where there is nothing


def hand_built_dataset(register_coco):
    anns = [{"image_id": 1, "category_id": 1, "bbox": b} for b in (CAR_VT, CAR_T1, CAR_T2, CAR_S, CAR_M)]
    anns.append({"image_id": 1, "category_id": 2, "bbox": SHIP_T})
    return register_coco([{"id": 1, "width": 200, "height": 200, "file_name": "a.png"}], anns)


def hand_built_predictions():
    """car: exact hits on very tiny (0.95), tiny #1 (0.90), medium (0.60), small (0.50); a 24-px
    false positive at 0.85; tiny #2 missed. ship: exact hit (0.30)."""
    boxes = [xywh_to_xyxy(CAR_VT), xywh_to_xyxy(CAR_T1), CAR_FALSE_POSITIVE, xywh_to_xyxy(CAR_M),
             xywh_to_xyxy(CAR_S), xywh_to_xyxy(SHIP_T)]
    return make_output(boxes, [0.95, 0.90, 0.85, 0.60, 0.50, 0.30], [0, 0, 0, 0, 0, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_band_ap_and_ar_match_hand_computation(register_coco, backend):
    name = hand_built_dataset(register_coco)
    res = evaluate(SmallObjectCOCOEvaluator(name, backend=backend), [(1, hand_built_predictions())])

    # car, all sizes, 5 GT. Ranked: TP TP FP TP TP -> precision 1, 1, 2/3, 3/4, 4/5 at recall
    # .2 .4 .4 .6 .8; best precision at recall >= r: 1 for r <= .4 (41 thresholds), 0.8 for
    # .41..0.8 (40 thresholds), 0 above.
    car_all = (41 * 1 + 40 * 0.8) / 101 * 100
    ship_all = 100.0  # one GT, one exact hit
    assert res["AP-car"] == pytest.approx(car_all, abs=1e-6)
    assert res["AP-ship"] == pytest.approx(ship_all, abs=1e-6)
    assert res["AP"] == pytest.approx((car_all + ship_all) / 2, abs=1e-6)
    assert res["AP50"] == pytest.approx(res["AP"], abs=1e-6) and res["AP75"] == pytest.approx(res["AP"], abs=1e-6)

    # COCO small (area <= 32^2): car GTs vt, t1, t2, s (the medium hit is ignored, the 24-px false
    # positive counts): TP TP FP TP -> precision 1, 1, 2/3, 3/4 at recall .25 .5 .5 .75:
    # 1 for r <= .5 (51 thresholds), .75 for .51..0.75 (25 thresholds).
    car_small = (51 * 1 + 25 * 0.75) / 101 * 100
    assert res["APs"] == pytest.approx((car_small + 100) / 2, abs=1e-6)
    assert res["APm"] == pytest.approx(100.0, abs=1e-6)  # car medium found; ship has no medium GT
    assert math.isnan(res["APl"])  # no GT in the band at all

    # AI-TOD bands (ship only has a tiny GT, so it only enters AP_t).
    assert res["AP_vt"] == pytest.approx(100.0, abs=1e-6)
    car_tiny = 51 / 101 * 100  # one of two found at the top score: precision 1 up to recall .5
    assert res["AP_t"] == pytest.approx((car_tiny + 100) / 2, abs=1e-6)
    # one GT, the false positive (same band) ranked above the hit: precision 1/2 at recall 1.
    assert res["AP_s_tod"] == pytest.approx(50.0, abs=1e-6)

    # Recall: car finds 4 of 5 (1 of 5 within its single best detection), ship 1 of 1.
    assert res["AR@1"] == pytest.approx((1 / 5 + 1) / 2 * 100, abs=1e-6)
    assert res["AR@10"] == pytest.approx((4 / 5 + 1) / 2 * 100, abs=1e-6)
    assert res["AR@100"] == pytest.approx(res["AR@10"], abs=1e-6)
    assert res["ARs"] == pytest.approx((3 / 4 + 1) / 2 * 100, abs=1e-6)
    assert res["AR_vt"] == pytest.approx(100.0, abs=1e-6)
    assert res["AR_t"] == pytest.approx((1 / 2 + 1) / 2 * 100, abs=1e-6)
    assert res["AR_s_tod"] == pytest.approx(100.0, abs=1e-6)
    assert math.isnan(res["ARl"])


def test_per_class_table_keys_and_log(register_coco, caplog):
    name = hand_built_dataset(register_coco)
    with caplog.at_level("INFO"):
        res = evaluate(SmallObjectCOCOEvaluator(name, backend="auto"), [(1, hand_built_predictions())])
    assert sorted(k for k in res if k.startswith("AP-")) == ["AP-car", "AP-ship"]
    assert "Per-category bbox AP" in caplog.text and "| car " in caplog.text
    assert "backend=faster" in caplog.text  # faster-coco-eval is installed here


def test_detection_cap_truncates_predictions(register_coco, tmp_path):
    name = hand_built_dataset(register_coco)
    evaluator = SmallObjectCOCOEvaluator(name, output_dir=str(tmp_path / "out"), max_dets=2)
    res = evaluate(evaluator, [(1, hand_built_predictions())])
    saved = json.loads((tmp_path / "out" / "coco_instances_results.json").read_text())
    assert sorted(r["score"] for r in saved) == pytest.approx([0.90, 0.95])  # the two best, across classes
    # car keeps its two top hits: precision 1 up to recall 2/5 (41 thresholds); ship keeps nothing.
    assert res["AP-car"] == pytest.approx(41 / 101 * 100, abs=1e-6)
    assert res["AP-ship"] == pytest.approx(0.0, abs=1e-6)
    assert res["AR@2"] == pytest.approx((2 / 5 + 0) / 2 * 100, abs=1e-6)
    assert "AR@10" not in res and "AR@100" not in res
    assert max_dets_thresholds(1500) == [1, 10, 1500] and max_dets_thresholds(5) == [1, 5]


def test_no_predictions_gives_nan(register_coco):
    name = hand_built_dataset(register_coco)
    res = evaluate(SmallObjectCOCOEvaluator(name), [(1, make_output([], [], []))])
    assert all(math.isnan(v) for v in res.values()) and "AP_vt" in res


def random_dataset_and_predictions(seed=0, num_images=4, size=256):
    rng = np.random.default_rng(seed)
    images, anns, outputs = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": size, "height": size, "file_name": f"{image_id}.png"})
        boxes, scores, classes = [], [], []
        for _ in range(25):
            side = float(np.exp(rng.uniform(np.log(3), np.log(120))))
            w, h = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
            x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
            cls = int(rng.integers(0, 2))
            anns.append({"image_id": image_id, "category_id": cls + 1, "bbox": [x, y, w, h]})
            if rng.random() < 0.8:  # a noisy detection of it, sometimes with the wrong class
                dx, dy = rng.normal(0, 0.15 * side, 2)
                boxes.append([x + dx, y + dy, x + dx + w * rng.uniform(0.8, 1.2), y + dy + h * rng.uniform(0.8, 1.2)])
                scores.append(float(rng.uniform(0.05, 1)))
                classes.append(cls if rng.random() < 0.9 else 1 - cls)
        for _ in range(10):  # false positives
            side = float(rng.uniform(3, 60))
            x, y = rng.uniform(0, size - side, 2)
            boxes.append([x, y, x + side, y + side])
            scores.append(float(rng.uniform(0.05, 1)))
            classes.append(int(rng.integers(0, 2)))
        outputs.append((image_id, make_output(boxes, scores, classes, (size, size))))
    return images, anns, outputs


@pytest.mark.parametrize("max_dets", [20, 100])
def test_faster_and_pycocotools_agree(register_coco, max_dets):
    images, anns, outputs = random_dataset_and_predictions()
    name = register_coco(images, anns)
    faster = evaluate(SmallObjectCOCOEvaluator(name, backend="faster", max_dets=max_dets), outputs)
    reference = evaluate(SmallObjectCOCOEvaluator(name, backend="pycocotools", max_dets=max_dets), outputs)
    assert faster.keys() == reference.keys()
    assert 0 < reference["AP"] < 100 and 0 < reference["AP_vt"] < 100  # a non-trivial case
    for key in reference:
        assert faster[key] == pytest.approx(reference[key], abs=1e-6, nan_ok=True), key


def test_rejects_unknown_backend(register_coco):
    name = hand_built_dataset(register_coco)
    with pytest.raises(ValueError, match="backend"):
        SmallObjectCOCOEvaluator(name, backend="lvis")
