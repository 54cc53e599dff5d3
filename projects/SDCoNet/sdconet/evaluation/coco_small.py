"""COCO box evaluation that also reports the AI-TOD tiny-object size bands.

COCO's "small" (< 32 px) lumps together everything a remote-sensing detector finds hard;
AI-TOD splits it by the side of the ground-truth box, sqrt(area):

    very tiny  < 8 px     area in [0, 64]       -> AP_vt, AR_vt
    tiny       8 - 16 px  area in [64, 256]     -> AP_t,  AR_t
    small      16 - 32 px area in [256, 1024]   -> AP_s_tod, AR_s_tod

Areas come from the ground-truth json's ``area`` field (the box area for box-only datasets).
As in COCOeval, both ends of a range are inclusive, so a box of exactly 8x8 counts in both
of the first two bands.

Two protocols choose which detections each number counts (TEST.SDCONET.PROTOCOL):

* ``"coco"``: maxDets 1, 10 and the detection cap (TEST.DETECTIONS_PER_IMAGE); every AP and
  band is read at the cap.
* ``"mmdet"``: the numbers MMDetection's ``CocoMetric`` reports, i.e. the protocol of papers
  trained with it. See :data:`MMDET_MAX_DETS`.
"""
import contextlib
import io
import itertools
import json
import os

import numpy as np
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table
from pycocotools.cocoeval import COCOeval
from tabulate import tabulate

# (COCOeval label, min area, max area, suffix of the AP/AR result keys); "all" must stay first.
AREA_RANGES = (
    ("all", 0, 1e5**2, ""),
    ("small", 0, 32**2, "s"),
    ("medium", 32**2, 96**2, "m"),
    ("large", 96**2, 1e5**2, "l"),
    ("verytiny", 0, 8**2, "_vt"),
    ("tiny", 8**2, 16**2, "_t"),
    ("small_tod", 16**2, 32**2, "_s_tod"),
)
BACKENDS = ("auto", "faster", "pycocotools")
PROTOCOLS = ("coco", "mmdet")
# MMDetection's CocoMetric (mmdet/evaluation/metrics/coco_metric.py) sets COCOeval's maxDets to its
# proposal_nums, (100, 300, 1000) by default, and reports COCOeval.summarize()'s stats: stats[0], its
# mAP, is summarized with pycocotools' default maxDets=100, while stats[1:6] (mAP_50, mAP_75, mAP_s,
# mAP_m, mAP_l) are read at maxDets[2] = 1000, i.e. with every detection the model keeps (300 for
# DINO). Its per-class table also reads the last maxDets. So only mAP ignores detections ranked
# below 100 in an image; the "mmdet" protocol reads AP at 100 and everything else at 1000.
MMDET_MAX_DETS = (100, 300, 1000)


def resolve_backend(backend: str) -> str:
    """``"faster"`` when faster-coco-eval is importable (or demanded), else ``"pycocotools"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "pycocotools":
        return backend
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        if backend == "faster":
            raise ImportError("backend='faster' needs the faster-coco-eval package") from None
        return "pycocotools"
    return "faster"


def max_dets_thresholds(max_dets: int) -> list:
    """COCOeval ``maxDets``: 1 and 10 (when below the cap) then the cap, which COCOeval uses for AP."""
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    return [d for d in (1, 10) if d < max_dets] + [max_dets]


def protocol_max_dets(protocol: str, max_dets: int):
    """(COCOeval maxDets, index of the one that "AP" is read at) of a protocol; every other AP,
    band and per-class AP is read at the last maxDets."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "mmdet":
        return list(MMDET_MAX_DETS), MMDET_MAX_DETS.index(100)
    return max_dets_thresholds(max_dets), -1


def mean_valid_percent(values: np.ndarray) -> float:
    """Mean of the entries COCOeval filled (> -1), in percent; NaN when a band has no ground truth."""
    valid = values[values > -1]
    return float(np.mean(valid) * 100) if valid.size else float("nan")


class SmallObjectCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` for boxes with the AI-TOD bands, AR, a detection cap and per-class AP.

    Results (percent, NaN where a band has no ground truth) under ``results["bbox"]``:
    AP, AP50, AP75, APs, APm, APl, AP_vt, AP_t, AP_s_tod, AR@<maxDets> for each maxDets,
    ARs, ARm, ARl, AR_vt, AR_t, AR_s_tod, and ``AP-<class name>``.

    ``max_dets`` keeps only the highest-scoring detections of each image before evaluation. With
    ``protocol="coco"`` it is also COCOeval's top ``maxDets`` (AI-TOD evaluates with 1500; COCO
    with 100); with ``"mmdet"`` COCOeval uses :data:`MMDET_MAX_DETS` as MMDetection does.
    """

    def __init__(self, dataset_name, distributed=True, output_dir=None, *, max_dets: int = 100,
                 backend: str = "auto", protocol: str = "coco"):
        self._max_dets_list, self._ap_index = protocol_max_dets(protocol, max_dets)
        self._max_dets = max_dets
        self._protocol = protocol
        super().__init__(dataset_name, tasks=("bbox",), distributed=distributed, output_dir=output_dir,
                         max_dets_per_image=max_dets, use_fast_impl=False)
        self._backend = resolve_backend(backend)
        self._faster_coco_api = None
        if self._backend == "faster" and self._do_evaluation:
            from faster_coco_eval import COCO as FasterCOCO

            # its own copy: both backends write flags into the ground-truth dicts they load
            self._faster_coco_api = FasterCOCO(PathManager.get_local_path(self._metadata.json_file))
        read_at = (f"AP at maxDets {self._max_dets_list[self._ap_index]}, the rest at {self._max_dets_list[-1]}"
                   if protocol == "mmdet" else f"every AP at maxDets {self._max_dets_list[-1]}")
        self._logger.info(f"SmallObjectCOCOEvaluator on '{dataset_name}': protocol={protocol} ({read_at}; "
                          f"detections per image capped at {max_dets}), backend={self._backend}, "
                          f"maxDets={self._max_dets_list}")

    def process(self, inputs, outputs):
        for input, output in zip(inputs, outputs):
            if "instances" not in output:
                continue
            instances = output["instances"].to(self._cpu_device)
            if len(instances) > self._max_dets:
                instances = instances[instances.scores.argsort(descending=True)[: self._max_dets]]
            self._predictions.append({"image_id": input["image_id"],
                                      "instances": instances_to_coco_json(instances, input["image_id"])})

    def _eval_predictions(self, predictions, img_ids=None):
        coco_results = list(itertools.chain(*[p["instances"] for p in predictions]))
        id_map = self._metadata.get("thing_dataset_id_to_contiguous_id")
        if id_map:
            contiguous_to_dataset = {v: k for k, v in id_map.items()}
            for result in coco_results:
                result["category_id"] = contiguous_to_dataset[result["category_id"]]

        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            with PathManager.open(os.path.join(self._output_dir, "coco_instances_results.json"), "w") as f:
                f.write(json.dumps(coco_results))

        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        self._logger.info(f"Evaluating {len(coco_results)} boxes with the {self._backend} COCO API ...")
        coco_eval = self._run_cocoeval(coco_results, img_ids) if coco_results else None
        self._results["bbox"] = self._derive_small_object_results(coco_eval, self._metadata.get("thing_classes"))

    def _run_cocoeval(self, coco_results, img_ids=None):
        """evaluate() + accumulate() with our area ranges and maxDets; summarize() is skipped
        because pycocotools' version only knows the small/medium/large labels."""
        if self._backend == "faster":
            from faster_coco_eval import COCOeval_faster

            coco_dt = self._faster_coco_api.loadRes(coco_results)
            coco_eval = COCOeval_faster(self._faster_coco_api, coco_dt, "bbox", print_function=self._logger.debug)
        else:
            coco_dt = self._coco_api.loadRes(coco_results)
            coco_eval = COCOeval(self._coco_api, coco_dt, "bbox")
        params = coco_eval.params
        params.areaRng = [[low, high] for _, low, high, _ in AREA_RANGES]
        params.areaRngLbl = [label for label, _, _, _ in AREA_RANGES]
        params.maxDets = list(self._max_dets_list)
        if img_ids is not None:
            params.imgIds = img_ids
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco_eval.evaluate()
            coco_eval.accumulate()
        return coco_eval

    def _summary_keys(self):
        keys = ["AP", "AP50", "AP75"] + ["AP" + suffix for *_, suffix in AREA_RANGES[1:]]
        keys += [f"AR@{d}" for d in self._max_dets_list] + ["AR" + suffix for *_, suffix in AREA_RANGES[1:]]
        return keys

    def _derive_small_object_results(self, coco_eval, class_names=None):
        """Summary numbers read straight from COCOeval's precision/recall arrays, the way
        COCOeval.summarize averages them, plus the per-class AP table."""
        if coco_eval is None:
            self._logger.warning("No predictions from the model!")
            return {key: float("nan") for key in self._summary_keys()}

        precision = coco_eval.eval["precision"]  # [IoU, recall threshold, class, area range, maxDets]
        recall = coco_eval.eval["recall"]  # [IoU, class, area range, maxDets]
        iou_thresholds = np.asarray(coco_eval.params.iouThrs)
        iou50 = int(np.flatnonzero(np.isclose(iou_thresholds, 0.5))[0])
        iou75 = int(np.flatnonzero(np.isclose(iou_thresholds, 0.75))[0])

        results = {
            "AP": mean_valid_percent(precision[:, :, :, 0, self._ap_index]),
            "AP50": mean_valid_percent(precision[iou50, :, :, 0, -1]),
            "AP75": mean_valid_percent(precision[iou75, :, :, 0, -1]),
        }
        for area_index, (*_, suffix) in enumerate(AREA_RANGES[1:], start=1):
            results["AP" + suffix] = mean_valid_percent(precision[:, :, :, area_index, -1])
        for det_index, max_dets in enumerate(coco_eval.params.maxDets):
            results[f"AR@{max_dets}"] = mean_valid_percent(recall[:, :, 0, det_index])
        for area_index, (*_, suffix) in enumerate(AREA_RANGES[1:], start=1):
            results["AR" + suffix] = mean_valid_percent(recall[:, :, area_index, -1])

        ap_part = {k: v for k, v in results.items() if k.startswith("AP")}
        ar_part = {k: v for k, v in results.items() if k.startswith("AR")}
        self._logger.info(f"Evaluation results for bbox, {self._protocol} protocol "
                          "(AP_vt <8 px, AP_t 8-16 px, AP_s_tod 16-32 px): \n"
                          + create_small_table(ap_part) + "\n" + create_small_table(ar_part))

        if not class_names:
            return results
        if len(class_names) != precision.shape[2]:
            raise ValueError(f"{len(class_names)} class names but COCOeval has {precision.shape[2]} categories")
        per_class = [(name, mean_valid_percent(precision[:, :, k, 0, -1])) for k, name in enumerate(class_names)]
        self._logger.info("Per-category bbox AP: \n" + per_class_table(per_class))
        results.update({f"AP-{name}": ap for name, ap in per_class})
        return results


def per_class_table(per_class, pairs_per_row: int = 3) -> str:
    """Markdown-style table of (class, AP) pairs laid out ``pairs_per_row`` to a line."""
    pairs_per_row = max(1, min(pairs_per_row, len(per_class)))
    rows = []
    for start in range(0, len(per_class), pairs_per_row):
        row = list(itertools.chain(*per_class[start:start + pairs_per_row]))
        rows.append(row + [""] * (2 * pairs_per_row - len(row)))
    return tabulate(rows, headers=["category", "AP"] * pairs_per_row, tablefmt="pipe", floatfmt=".3f",
                    numalign="left")
