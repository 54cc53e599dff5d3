"""TEST.SDCONET.PROTOCOL: "coco" reads every AP at the detection cap, "mmdet" as MMDetection's CocoMetric.

The hand-made case: one 2000 x 2000 image, 50 ground-truth boxes of one class (small, medium and
large), 150 detections: 100 confident false positives, then the 50 exact hits ranked 101-150.
Within the top 100 of the image nothing is right, so MMDetection's mAP (maxDets 100) is 0, while
everything read at 300 or 1000 detections sees the hits: precision climbs to 50/150 = 1/3 at
full recall, so every recall threshold has best precision 1/3 and AP = 100/3.
"""
import contextlib
import glob
import io
import json
import os
import uuid

import pytest
import torch
from common import REPO, TINY, load_cfg
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sdconet import get_sdconet_cfg
from sdconet.engine.trainer import Trainer
from sdconet.evaluation.coco_small import MMDET_MAX_DETS, SmallObjectCOCOEvaluator

BACKENDS = ("faster", "pycocotools")
SIDES = (20, 50, 120)  # COCO small, medium, large


def ground_truth_boxes():
    """50 XYWH boxes on a 150-px grid in the top half of the image, sides cycling through SIDES."""
    return [[float(150 * (i % 10)), float(150 * (i // 10)), float(SIDES[i % 3]), float(SIDES[i % 3])]
            for i in range(50)]


def detections():
    """(XYWH boxes, scores): 100 30-px false positives in the empty bottom half, then the 50 hits."""
    false_positives = [[float(70 * (i % 10)), float(1250 + 70 * (i // 10)), 30.0, 30.0] for i in range(100)]
    scores = [0.99 - 0.001 * i for i in range(100)] + [0.5 - 0.001 * i for i in range(50)]
    return false_positives + ground_truth_boxes(), scores


@pytest.fixture
def dataset(tmp_path):
    """The case's json, registered under a fresh name; removed afterwards."""
    name = f"protocol_test_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "gt.json"
    annotations = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                   for i, b in enumerate(ground_truth_boxes())]
    path.write_text(json.dumps({"images": [{"id": 1, "width": 2000, "height": 2000, "file_name": "a.png"}],
                                "annotations": annotations, "categories": [{"id": 1, "name": "car"}]}))
    MetadataCatalog.get(name).set(json_file=str(path), thing_classes=["car"], thing_dataset_id_to_contiguous_id={1: 0})
    yield name, path
    MetadataCatalog.remove(name)


def evaluate(evaluator):
    boxes, scores = detections()
    instances = Instances((2000, 2000))
    instances.pred_boxes = Boxes(torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes]))
    instances.scores = torch.tensor(scores)
    instances.pred_classes = torch.zeros(len(boxes), dtype=torch.int64)
    evaluator.reset()
    evaluator.process([{"image_id": 1}], [{"instances": instances}])
    return evaluator.evaluate()["bbox"]


def reference_cocoeval(json_path, max_dets):
    """pycocotools' COCOeval on the same detections with ``params.maxDets`` set by hand."""
    boxes, scores = detections()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(json_path))
        dt = gt.loadRes([{"image_id": 1, "category_id": 1, "bbox": b, "score": s} for b, s in zip(boxes, scores)])
        coco_eval = COCOeval(gt, dt, "bbox")
        coco_eval.params.maxDets = list(max_dets)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


@pytest.mark.parametrize("backend", BACKENDS)
def test_mmdet_protocol_matches_cocoeval_with_mmdetections_max_dets(dataset, backend, caplog):
    name, json_path = dataset
    with caplog.at_level("INFO"):
        res = evaluate(SmallObjectCOCOEvaluator(name, max_dets=300, backend=backend, protocol="mmdet"))
    assert "protocol=mmdet" in caplog.text and "maxDets=[100, 300, 1000]" in caplog.text

    assert res["AP"] == pytest.approx(0.0, abs=1e-6)  # the top 100 hold no hit
    assert res["AP50"] == pytest.approx(100 / 3, abs=1e-6) and res["AP75"] == pytest.approx(100 / 3, abs=1e-6)
    # What MMDetection's CocoMetric reports: COCOeval.summarize() with maxDets (100, 300, 1000).
    stats = reference_cocoeval(json_path, MMDET_MAX_DETS).stats * 100
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100", "AR@300", "AR@1000", "ARs", "ARm", "ARl"]
    for key, expected in zip(keys, stats):
        assert res[key] == pytest.approx(expected, abs=1e-6), key
    # The bands see the hits ranked past 100 too: the 30-px false positives are small, so the 17
    # small hits come after 100 of them (precision 17/117); medium and large have no false positive.
    assert res["APs"] == pytest.approx(100 * 17 / 117, abs=1e-6) and res["APm"] == pytest.approx(100.0, abs=1e-6)
    assert res["AR@100"] == pytest.approx(0.0, abs=1e-6) and res["AR@300"] == pytest.approx(100.0, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coco_protocol_reads_every_ap_at_the_cap(dataset, backend, caplog):
    name, json_path = dataset
    with caplog.at_level("INFO"):
        res = evaluate(SmallObjectCOCOEvaluator(name, max_dets=300, backend=backend, protocol="coco"))
    assert "protocol=coco" in caplog.text
    assert res["AP"] == pytest.approx(100 / 3, abs=1e-6)  # differs from "mmdet"'s 0 on the same detections
    reference = reference_cocoeval(json_path, (1, 10, 300))
    precision = reference.eval["precision"]  # [IoU, recall, class, area, maxDets]
    assert res["AP"] == pytest.approx(precision[:, :, :, 0, -1].mean() * 100, abs=1e-6)
    assert res["APs"] == pytest.approx(precision[:, :, :, 1, -1].mean() * 100, abs=1e-6)
    assert res["AR@300"] == pytest.approx(100.0, abs=1e-6) and "AR@1000" not in res


def test_trainer_builds_the_evaluator_of_the_configs_protocol(dataset, tmp_path):
    name, _ = dataset
    results = {}
    for protocol in ("coco", "mmdet"):
        cfg = load_cfg(TINY, ["TEST.SDCONET.PROTOCOL", protocol, "TEST.DETECTIONS_PER_IMAGE", 300])
        evaluators = Trainer.build_evaluator(cfg, name, output_folder=str(tmp_path / protocol))
        results[protocol] = evaluate(evaluators)
    assert results["coco"]["AP"] == pytest.approx(100 / 3, abs=1e-6)
    assert results["mmdet"]["AP"] == pytest.approx(0.0, abs=1e-6)


def test_unknown_protocol_is_refused_naming_the_key(dataset):
    with pytest.raises(ValueError, match=r"Invalid config: TEST\.SDCONET\.PROTOCOL='voc': must be coco or mmdet"):
        load_cfg(TINY, ["TEST.SDCONET.PROTOCOL", "voc"])
    with pytest.raises(ValueError, match="protocol"):
        SmallObjectCOCOEvaluator(dataset[0], protocol="voc")


def test_paper_configs_evaluate_as_mmdetection_and_the_tiny_ones_as_coco():
    paper = [p for folder in ("SDCoNet", "Baselines")
             for p in glob.glob(os.path.join(REPO, "configs", folder, "**", "*.yaml"), recursive=True)]
    tiny = glob.glob(os.path.join(REPO, "configs", "quick_schedules", "*.yaml"))
    assert len(paper) >= 14 and len(tiny) >= 2
    for path in paper:
        assert get_sdconet_cfg(path).TEST.SDCONET.PROTOCOL == "mmdet", path
    for path in tiny:
        assert get_sdconet_cfg(path).TEST.SDCONET.PROTOCOL == "coco", path
