"""Pascal-VOC XML parser for HRSSD / HRRSD (Zhang et al., TGRS 2019).

The HRRSD release (``OPT2017/``) has ``Annotations/*.xml``, ``JPEGImages/*.jpg`` and
``ImageSets/Main/{train,val,trainval,test}.txt``. Class names are spelled differently
across copies ("T junction", "T_junction", "ground-track-field"...), so they are matched
ignoring case, spaces, underscores and hyphens.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .tiling import SourceImage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def normalize_class_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


class ClassNameMatcher:
    """Maps raw class names to 0-based indices of ``class_names``, tolerant to spelling."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self._index: Dict[str, int] = {normalize_class_name(n): i for i, n in enumerate(class_names)}

    def __call__(self, name: str, source) -> int:
        key = normalize_class_name(name)
        if key not in self._index:
            raise ValueError(f"{source}: unknown class name {name!r} (expected one of {self.class_names})")
        return self._index[key]


def parse_voc_xml(xml_path: Path, matcher: ClassNameMatcher):
    """Boxes (xyxy, float pixels) and 0-based labels of one VOC annotation file.

    VOC corners are 1-based inclusive pixel indices; like detectron2's VOC loader we
    subtract 1 from xmin/ymin so that width = xmax - xmin + 1.
    """
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml_path}: invalid XML ({e})") from e
    boxes, labels = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if box is None:
            raise ValueError(f"{xml_path}: object {name!r} without <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{xml_path}: object {name!r} has a malformed <bndbox>") from e
        labels.append(matcher(name, xml_path))
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def find_voc_root(src: Path) -> Path:
    """The folder holding ``Annotations/``: ``src`` itself or ``src/OPT2017``."""
    src = Path(src)
    for candidate in (src, src / "OPT2017"):
        if (candidate / "Annotations").is_dir():
            return candidate
    raise FileNotFoundError(f"no Annotations/ folder in {src} or {src / 'OPT2017'}")


def find_image(image_dir: Path, stem: str, default_ext: str = ".jpg") -> Path:
    """The image named ``stem`` in ``image_dir`` whatever its extension.

    When none exists, returns the expected ``stem + default_ext`` path so the error
    raised when reading it names the file the release should contain.
    """
    for ext in IMAGE_EXTENSIONS:
        for candidate in (image_dir / (stem + ext), image_dir / (stem + ext.upper())):
            if candidate.is_file():
                return candidate
    return image_dir / (stem + default_ext)


def read_image_set(voc_root: Path, name: str) -> Optional[List[str]]:
    """Image ids listed in ``ImageSets/Main/<name>.txt``, or None when the file is absent."""
    path = Path(voc_root) / "ImageSets" / "Main" / f"{name}.txt"
    if not path.is_file():
        return None
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def official_splits(voc_root: Path) -> Optional[Dict[str, List[str]]]:
    """{'train': ids, 'test': ids} from ImageSets (trainval, else train + val); None if absent."""
    test = read_image_set(voc_root, "test")
    train = read_image_set(voc_root, "trainval")
    if train is None:
        parts = [read_image_set(voc_root, n) for n in ("train", "val")]
        if any(p is not None for p in parts):
            train = [i for p in parts if p is not None for i in p]
    if train is None or test is None:
        return None
    return dict(train=sorted(set(train)), test=sorted(set(test)))


def load_voc_sources(voc_root: Path, class_names: Sequence[str],
                     image_ids: Optional[Sequence[str]] = None) -> List[SourceImage]:
    """One :class:`SourceImage` per annotation file (or per id in ``image_ids``)."""
    voc_root = Path(voc_root)
    matcher = ClassNameMatcher(class_names)
    annotation_dir, image_dir = voc_root / "Annotations", voc_root / "JPEGImages"
    if image_ids is None:
        image_ids = sorted(p.stem for p in annotation_dir.glob("*.xml"))
    sources = []
    for image_id in image_ids:
        xml_path = annotation_dir / f"{image_id}.xml"
        if not xml_path.is_file():
            raise FileNotFoundError(f"annotation file not found: {xml_path}")
        boxes, labels = parse_voc_xml(xml_path, matcher)
        sources.append(SourceImage(find_image(image_dir, image_id), image_id, boxes, labels))
    return sources
