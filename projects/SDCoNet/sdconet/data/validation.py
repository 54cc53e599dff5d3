"""Checks of a COCO detection json, run once at load and by ``tools/train_net.py --check-data``.

detectron2's ``load_coco_json`` trusts its input: a duplicate image id silently gives one image
the other's boxes, a ``bbox`` given as a string fails much later without naming the file, and a
negative width turns into a valid box on the other side of x once a flip's ``apply_box`` sorts
the corners. :func:`validate_coco` finds these in the raw json; :class:`Findings` tells what is
wrong where. Fatal problems stop the load with one error naming the json, the ids and the field;
boxes with NaN or a negative / zero side are dropped at load, counted in the log.
"""
import json
import math
from collections import Counter, defaultdict

FATAL, WARNING = "fatal", "warning"

KINDS = {  # kind: (severity, what is wrong and what happens to it)
    "json": (FATAL, "not a readable COCO json"),
    "dataset": (FATAL, "the dataset cannot be loaded"),
    "image_field": (FATAL, "image entry without a valid 'id', 'file_name', 'height' or 'width'"),
    "duplicate_image_id": (FATAL, "image id listed more than once (one image would get the other's boxes)"),
    "category_field": (FATAL, "category without a valid 'id' or 'name'"),
    "annotation_field": (FATAL, "annotation without a valid 'id', 'image_id' or 'category_id'"),
    "duplicate_annotation_id": (FATAL, "annotation id listed more than once"),
    "bbox_format": (FATAL, "'bbox' missing or not 4 numbers [x, y, width, height]"),
    "image_unreadable": (FATAL, "image file missing or not decodable"),
    "image_size": (FATAL, "image size differs from the json's height / width"),
    "num_classes": (FATAL, "MODEL.SDCONET.NUM_CLASSES differs from the dataset's class count"),
    "no_annotations": (FATAL, "training set without a single annotation"),
    "bbox_nan": (WARNING, "'bbox' holds NaN or infinity: dropped at load"),
    "bbox_empty": (WARNING, "'bbox' with a negative or zero width or height: dropped at load"),
    "unknown_category": (WARNING, "category_id not among the json's categories: dropped at load"),
    "unknown_image": (WARNING, "image_id names no image of the json: ignored"),
    "outside_image": (WARNING, "box entirely outside its image: dropped by the mapper"),
}
DROPPED_AT_LOAD = ("bbox_nan", "bbox_empty")  # unknown categories are dropped by the category mapping
MAX_EXAMPLES = 5


class Findings:
    """Problems found, counted by kind and place (a json file, a dataset name), a few examples each."""

    def __init__(self):
        self.counts = Counter()  # (kind, place) -> count
        self.examples = defaultdict(list)  # (kind, place) -> first MAX_EXAMPLES examples
        self.annotation_ids = defaultdict(set)  # kind -> annotation ids (what the load drops)

    def add(self, kind: str, place: str, example: str, annotation_id=None):
        if kind not in KINDS:
            raise KeyError(f"unknown problem kind {kind!r}")
        self.counts[kind, place] += 1
        if len(self.examples[kind, place]) < MAX_EXAMPLES:
            self.examples[kind, place].append(example)
        if annotation_id is not None:
            self.annotation_ids[kind].add(annotation_id)

    def count(self, severity=None, place=None, kinds=None) -> int:
        return sum(n for (kind, where), n in self.counts.items()
                   if (severity is None or KINDS[kind][0] == severity) and (place is None or where == place)
                   and (kinds is None or kind in kinds))

    def lines(self, severity=None, kinds=None) -> list:
        """One line per kind (severity, count, what is wrong), then one per place with its first examples."""
        out = []
        for kind, (sev, what) in KINDS.items():  # fatal kinds first, in KINDS order
            if (severity is not None and sev != severity) or (kinds is not None and kind not in kinds):
                continue
            places = [(where, n) for (k, where), n in self.counts.items() if k == kind]
            if not places:
                continue
            out.append(f"[{sev}] {sum(n for _, n in places)} x {what}")
            for where, n in places:
                shown = self.examples[kind, where]
                more = f"; and {n - len(shown)} more" if n > len(shown) else ""
                out.append(f"    {where}: " + "; ".join(shown) + more)
        return out

    def raise_if_fatal(self, place: str):
        """ValueError listing the fatal problems of ``place`` (a json file), if any."""
        if self.count(FATAL, place):
            raise ValueError(f"{place} is not a valid COCO detection json:\n" + "\n".join(self.lines(FATAL))
                             + "\n(tools/train_net.py --config-file <config> --check-data lists every problem)")


def read_coco_json(json_file: str) -> dict:
    """Parse ``json_file``; a truncated, corrupt or non-COCO file is a ValueError naming it."""
    try:
        with open(json_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file} is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}): "
                         f"it is truncated or corrupt; re-create it") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{json_file} is not a UTF-8 JSON file ({e.reason} at byte {e.start})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_file} is not a COCO json: expected an object with an 'images' list "
                         f"(and 'annotations', 'categories'), got {type(data).__name__}")
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise ValueError(f"{json_file} is not a COCO json: '{key}' is a {type(data[key]).__name__}, not a list")
    return data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


IMAGE_FIELDS = {"id": _is_id, "file_name": lambda v: isinstance(v, str) and v != "",
                "height": lambda v: _is_number(v) and v > 0, "width": lambda v: _is_number(v) and v > 0}


def _check_images(coco: dict, place: str, findings: Findings) -> dict:
    """Image entries: required fields and unique ids. Returns {id: image} of the usable ones."""
    images = {}
    for index, image in enumerate(coco["images"]):
        if not isinstance(image, dict):
            findings.add("image_field", place, f"images[{index}] is a {type(image).__name__}, not an object")
            continue
        label = f"image id {image['id']}" if _is_id(image.get("id")) else f"images[{index}]"
        why = [f"no '{key}'" if key not in image else f"'{key}' is {_short(image[key])}"
               for key, ok in IMAGE_FIELDS.items() if key not in image or not ok(image[key])]
        if why:
            findings.add("image_field", place, f"{label}: " + ", ".join(why))
            continue
        if image["id"] in images:
            findings.add("duplicate_image_id", place, f"image id {image['id']} is both "
                         f"{images[image['id']]['file_name']} and {image['file_name']}")
            continue
        images[image["id"]] = image
    return images


def _check_box(ann: dict, label: str, place: str, image, findings: Findings):
    if "bbox" not in ann:
        findings.add("bbox_format", place, f"{label}: no 'bbox'")
        return
    box = ann["bbox"]
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
        what = f"{len(box)} values" if isinstance(box, (list, tuple)) and len(box) != 4 else type(box).__name__
        findings.add("bbox_format", place, f"{label}: 'bbox' is {_short(box)} ({what})")
        return
    x, y, w, h = box
    if not all(math.isfinite(v) for v in box):
        findings.add("bbox_nan", place, f"{label}: 'bbox' is {box}", ann["id"])
    elif w <= 0 or h <= 0:
        findings.add("bbox_empty", place, f"{label}: width {w}, height {h}", ann["id"])
    elif image is not None and (x >= image["width"] or y >= image["height"] or x + w <= 0 or y + h <= 0):
        findings.add("outside_image", place,
                     f"{label}: 'bbox' {box} in a {image['width']}x{image['height']} image")


def validate_coco(coco: dict, place: str, findings: Findings = None) -> Findings:
    """Check the images and annotations of a parsed COCO json (``place`` names it in the findings).

    Annotations of the kinds in ``DROPPED_AT_LOAD`` have their ids in ``findings.annotation_ids``.
    """
    findings = findings if findings is not None else Findings()
    images = _check_images(coco, place, findings)
    category_ids = set()
    for index, category in enumerate(coco.get("categories", [])):
        if isinstance(category, dict) and _is_id(category.get("id")) and isinstance(category.get("name"), str):
            category_ids.add(category["id"])
        else:
            findings.add("category_field", place, f"categories[{index}]: {_short(category)}")
    seen = set()
    for index, ann in enumerate(coco.get("annotations", [])):
        if not isinstance(ann, dict):
            findings.add("annotation_field", place, f"annotations[{index}] is a {type(ann).__name__}, not an object")
            continue
        label = f"annotation id {ann['id']}" if _is_id(ann.get("id")) else f"annotations[{index}]"
        keys = ("id", "image_id", "category_id")
        why = [f"no '{key}'" for key in keys if key not in ann] + [
            f"'{key}' is {_short(ann[key])}" for key in keys if key in ann and not _is_id(ann[key])]
        if why:
            findings.add("annotation_field", place, f"{label}: " + ", ".join(why))
            continue
        if ann["id"] in seen:
            findings.add("duplicate_annotation_id", place, label)
            continue
        seen.add(ann["id"])
        if ann["image_id"] not in images:
            findings.add("unknown_image", place, f"{label}: image_id {_short(ann['image_id'])}")
        if ann["category_id"] not in category_ids:
            findings.add("unknown_category", place, f"{label}: category_id {_short(ann['category_id'])}")
        _check_box(ann, label, place, images.get(ann["image_id"]), findings)
    return findings


__all__ = ["DROPPED_AT_LOAD", "FATAL", "Findings", "KINDS", "WARNING", "read_coco_json", "validate_coco"]
