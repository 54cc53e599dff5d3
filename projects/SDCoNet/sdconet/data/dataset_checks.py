"""Checks of the datasets a config names, made before iteration 0 so a bad set fails in seconds.

* :func:`check_num_classes`: MODEL.SDCONET.NUM_CLASSES against each dataset's class count (a
  larger category id would otherwise fail deep in the denoising queries with an IndexError).
* :func:`training_dataset_dicts`: the training dicts; a training set without a single annotation
  is an error, since a detector cannot learn anything from it.
* :func:`check_data`: ``tools/train_net.py --check-data``: every json validated, every image
  decoded, one summary of what is wrong where.
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.build import filter_images_with_only_crowd_annotations

from .image_io import read_image_any, read_options
from .validation import FATAL, WARNING, Findings, read_coco_json, validate_coco


def num_classes_problem(cfg, dataset_name: str, key: str):
    """What is wrong when MODEL.SDCONET.NUM_CLASSES differs from the dataset's class count, else None.

    Datasets whose classes are not known yet (not loaded, no ``thing_classes``) are not checked.
    """
    classes = MetadataCatalog.get(dataset_name).get("thing_classes")
    num_classes = cfg.MODEL.SDCONET.NUM_CLASSES
    if classes is None or len(classes) == num_classes:
        return None
    return (f"MODEL.SDCONET.NUM_CLASSES is {num_classes} but dataset '{dataset_name}' ({key}) has "
            f"{len(classes)} classes ({', '.join(classes)}): set MODEL.SDCONET.NUM_CLASSES {len(classes)}")


def check_num_classes(cfg, dataset_names, key: str):
    """ValueError naming both numbers, the dataset and the config key when they differ."""
    for name in dataset_names:
        problem = num_classes_problem(cfg, name, key)
        if problem:
            raise ValueError(problem)


def count_annotations(dicts) -> int:
    """Annotations a detector can learn from (crowd regions are ignored by the mapper)."""
    return sum(1 for record in dicts for obj in record.get("annotations", []) if obj.get("iscrowd", 0) == 0)


def training_dataset_dicts(cfg):
    """The dicts of DATASETS.TRAIN, filtered as DATALOADER.FILTER_EMPTY_ANNOTATIONS says.

    An error when the datasets hold no annotation at all: training would run to the end and
    give a model that detects nothing (with filtering on, detectron2 would only say "No valid
    data found").
    """
    names = tuple(cfg.DATASETS.TRAIN)
    dicts = get_detection_dataset_dicts(names, filter_empty=False, min_keypoints=0, proposal_files=None)
    if count_annotations(dicts) == 0:
        raise ValueError(f"The training datasets {names} hold {len(dicts)} images but not a single annotation: "
                         f"a detector cannot learn from them (check their annotation files, or the "
                         f"$SDCONET_DATASETS root they are read from)")
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        dicts = filter_images_with_only_crowd_annotations(dicts)
    return dicts


@contextmanager
def _quiet():
    """Silence the load's own warnings: --check-data reports them once, in its summary."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _decode(record, cfg):
    """(problem kind, example) of one image read as training reads it, or None when it decodes at the
    json's size."""
    try:
        image = read_image_any(record["file_name"], format=cfg.INPUT.FORMAT, **read_options(cfg))
    except IOError as e:
        return "image_unreadable", str(e)
    expected = (record.get("height"), record.get("width"))
    if None not in expected and image.shape[:2] != expected:
        return "image_size", (f"{record['file_name']} is {image.shape[1]}x{image.shape[0]}, "
                              f"the json says {expected[1]}x{expected[0]}")
    return None


def check_data(cfg, workers: int = None):
    """Validate every json and decode every image of DATASETS.TRAIN and DATASETS.TEST.

    Returns (Findings, one line per dataset checked). Problems of one dataset do not stop the
    check of the others.
    """
    findings, checked = Findings(), []
    names = [(n, "DATASETS.TRAIN") for n in cfg.DATASETS.TRAIN]
    names += [(n, "DATASETS.TEST") for n in cfg.DATASETS.TEST if n not in cfg.DATASETS.TRAIN]
    train_annotations, train_loaded = 0, True
    workers = workers or min(8, os.cpu_count() or 1)
    for name, key in names:
        json_file = MetadataCatalog.get(name).get("json_file")
        if json_file and os.path.isfile(json_file):
            try:
                validate_coco(read_coco_json(json_file), json_file, findings)
            except ValueError as e:
                findings.add("json", json_file, str(e).removeprefix(f"{json_file} "))
            if findings.count(FATAL, place=json_file):  # loading would stop at the first of them
                train_loaded &= key != "DATASETS.TRAIN"
                continue
        try:
            with _quiet():
                dicts = DatasetCatalog.get(name)
        except Exception as e:  # any load error is reported; the other datasets are still checked
            findings.add("dataset", name, f"{type(e).__name__}: {e}")
            train_loaded &= key != "DATASETS.TRAIN"
            continue
        problem = num_classes_problem(cfg, name, key)
        if problem:
            findings.add("num_classes", name, problem)
        annotations = count_annotations(dicts)
        if key == "DATASETS.TRAIN":
            train_annotations += annotations
        with ThreadPoolExecutor(workers) as pool:  # OpenCV decodes without holding the GIL
            for problem in pool.map(lambda record: _decode(record, cfg), dicts):
                if problem:
                    findings.add(problem[0], name, problem[1])
        checked.append(f"{name} ({key}): {len(dicts)} images, {annotations} annotations")
    if cfg.DATASETS.TRAIN and train_loaded and train_annotations == 0:
        findings.add("no_annotations", ", ".join(cfg.DATASETS.TRAIN), "no annotation in any image")
    return findings, checked


def report_data_check(cfg, print_fn=print) -> int:
    """Run :func:`check_data`, print one summary; 1 when anything is fatal, else 0."""
    findings, checked = check_data(cfg)
    for line in [f"checked {c}" for c in checked] + findings.lines():
        print_fn(line)
    fatal, warnings = findings.count(FATAL), findings.count(WARNING)
    if fatal:
        print_fn(f"data check: {fatal} fatal problem(s), {warnings} warning(s): training would stop; fix them first")
        return 1
    print_fn(f"data check: no fatal problem ({warnings} warning(s))")
    return 0


__all__ = ["check_data", "check_num_classes", "count_annotations", "num_classes_problem", "report_data_check",
           "training_dataset_dicts"]
