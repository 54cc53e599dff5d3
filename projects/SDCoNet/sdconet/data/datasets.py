"""Registration of SDCoNet's datasets in detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

Every dataset lives under ``$SDCONET_DATASETS`` (default ``./datasets``) in the layout of the
authors' README, so users who already hold the authors' "-Split" sets can point at them::

    <root>/NWPU_VHR10_Split/{train,test}/images/*.png|jpg
    <root>/NWPU_VHR10_Split/{train,test}/annotations/instances_{train,test}.json   (COCO)

The annotation file may have another name if it is the only ``.json`` in ``annotations/``.
Names: ``nwpu_vhr10_split_{train,test}``, ``dota15_split_{train,test}``,
``hrssd_split_{train,test}``, ``synthetic_rs_{train,test}``.
"""
import glob
import logging
import os
from dataclasses import dataclass

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from .metadata import DOTA15_CLASSES, HRSSD_CLASSES, NWPU_VHR10_CLASSES, SYNTHETIC_RS_CLASSES
from .validation import DROPPED_AT_LOAD, read_coco_json, validate_coco

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    folder: str  # folder under the datasets root, as in the authors' README
    classes: tuple
    prepare: str  # the command that creates the folder


DATASETS = {
    "nwpu_vhr10_split": DatasetInfo(
        "NWPU_VHR10_Split", NWPU_VHR10_CLASSES,
        "python datasets/prepare_nwpu_vhr10.py --src <NWPU VHR-10 release folder>"),
    "dota15_split": DatasetInfo(
        "DOTAv1.5_Split", DOTA15_CLASSES,
        "python datasets/prepare_dota.py --src <DOTA-v1.5 folder with train/ and val/>"),
    "hrssd_split": DatasetInfo(
        "HRSSD_Split", HRSSD_CLASSES,
        "python datasets/prepare_hrssd.py --src <HRRSD release folder>"),
    "synthetic_rs": DatasetInfo(
        "Synthetic_RS", SYNTHETIC_RS_CLASSES,
        "python datasets/make_synthetic.py   (or: make data)"),
}


def datasets_root() -> str:
    """The datasets root: ``$SDCONET_DATASETS`` or ``./datasets``."""
    return os.path.abspath(os.environ.get("SDCONET_DATASETS", "datasets"))


def split_paths(root: str, info: DatasetInfo, split: str):
    """(json_file, image_root) of one split; json_file is the expected name if nothing exists yet."""
    base = os.path.join(root, info.folder, split)
    json_file = os.path.join(base, "annotations", f"instances_{split}.json")
    if not os.path.isfile(json_file):
        candidates = sorted(glob.glob(os.path.join(base, "annotations", "*.json")))
        if len(candidates) == 1:
            json_file = candidates[0]
    return json_file, os.path.join(base, "images")


def load_sdconet_json(json_file: str, image_root: str, dataset_name: str, prepare: str):
    """Load a COCO json into detectron2 dicts with contiguous category ids 0..N-1.

    The raw json is validated first (:mod:`.validation`): a broken json, duplicate ids or a
    malformed ``bbox`` is an error naming the json, the id and the field; boxes with NaN or a
    negative / zero side are dropped, counted in the log, whatever augmentations run later.
    Category ids are mapped in increasing id order onto ``thing_classes``; a json with another
    number of categories is an error (it is not the dataset this name stands for).
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"Dataset '{dataset_name}' is not prepared: {json_file} does not exist "
            f"(set $SDCONET_DATASETS to use another datasets root). Prepare it with:\n    {prepare}")
    meta = MetadataCatalog.get(dataset_name)
    coco = read_coco_json(json_file)
    findings = validate_coco(coco, json_file)
    findings.raise_if_fatal(json_file)
    categories = coco.get("categories", [])
    del coco
    dropped = set().union(*(findings.annotation_ids[kind] for kind in DROPPED_AT_LOAD))
    cat_ids = sorted(c["id"] for c in categories)
    if len(cat_ids) != len(meta.thing_classes):
        raise ValueError(
            f"{json_file} has {len(cat_ids)} categories but dataset '{dataset_name}' has "
            f"{len(meta.thing_classes)} classes ({', '.join(meta.thing_classes)})")
    # Without dataset_name, load_coco_json leaves category ids and metadata alone; we map them here
    # so that an authors' split whose class names are spelled differently still loads.
    dicts = load_coco_json(json_file, image_root, extra_annotation_keys=["id"])  # ids: to drop the bad boxes
    id_map = {cid: i for i, cid in enumerate(cat_ids)}
    names = {c["id"]: c["name"] for c in categories}
    mismatched = [(names[cid], meta.thing_classes[i]) for cid, i in id_map.items()
                  if names[cid].lower().replace("_", " ").replace("-", " ")
                  != meta.thing_classes[i].lower().replace("_", " ").replace("-", " ")]
    if mismatched:
        logger.warning(f"{json_file}: category names differ from {dataset_name}'s classes "
                       f"(json -> ours): {mismatched}; mapped by increasing category id")
    unknown = 0
    for record in dicts:
        kept = []
        for obj in record.get("annotations", []):
            if obj.pop("id") in dropped:
                continue
            if obj["category_id"] not in id_map:
                unknown += 1
                continue
            obj["category_id"] = id_map[obj["category_id"]]
            kept.append(obj)
        record["annotations"] = kept
    if dropped:
        logger.warning(f"{json_file}: dropped {len(dropped)} annotations with an unusable box:\n"
                       + "\n".join(findings.lines(kinds=DROPPED_AT_LOAD)))
    if unknown:
        logger.warning(f"{json_file}: dropped {unknown} annotations with unknown category ids")
    if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        meta.thing_dataset_id_to_contiguous_id = id_map
    return dicts


def register_sdconet_dataset(name: str, json_file: str, image_root: str, classes=None) -> None:
    """Register a COCO json dataset of your own under ``name``, loaded and checked as the built-in
    ones (:func:`load_sdconet_json`); registering a name again replaces it.

    ``classes``: the class names in increasing category-id order, which is how the ids are mapped
    onto 0..N-1; by default the json's own category names. MODEL.SDCONET.NUM_CLASSES must equal
    their count (training and ``--dry-run`` stop naming both numbers otherwise).
    """
    if classes is None:
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"Dataset '{name}': {json_file} does not exist")
        classes = [c["name"] for c in sorted(read_coco_json(json_file).get("categories", []), key=lambda c: c["id"])]
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    hint = f"point register_sdconet_dataset('{name}', ...) at an existing COCO json"
    DatasetCatalog.register(name, lambda: load_sdconet_json(json_file, image_root, name, hint))
    MetadataCatalog.get(name).set(thing_classes=list(classes), json_file=json_file, image_root=image_root,
                                  evaluator_type="coco")


def register_sdconet_datasets(root: str | None = None):
    """Register every SDCoNet dataset under ``root`` (default :func:`datasets_root`).

    Idempotent: names already registered with the same root are left alone; registering with
    another root replaces them (useful in notebooks and tests).
    """
    root = os.path.abspath(root or datasets_root())
    for key, info in DATASETS.items():
        for split in SPLITS:
            name = f"{key}_{split}"
            if name in DatasetCatalog.list():
                if MetadataCatalog.get(name).get("dataset_root") == root:
                    continue
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
            json_file, image_root = split_paths(root, info, split)
            DatasetCatalog.register(
                name, lambda j=json_file, i=image_root, n=name, p=info.prepare: load_sdconet_json(j, i, n, p))
            MetadataCatalog.get(name).set(
                thing_classes=list(info.classes), json_file=json_file, image_root=image_root,
                evaluator_type="coco", dataset_root=root, prepare_command=info.prepare)
    return root
