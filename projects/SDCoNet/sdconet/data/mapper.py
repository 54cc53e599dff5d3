"""Dataset mapper: reads remote-sensing images of any bit depth / channel count into the model's format.

detectron2's ``DatasetMapper`` reads with PIL (8-bit RGB-centric) and only flips horizontally.
Remote-sensing tiles come as 16-bit multi-band GeoTIFFs, single-band images or RGBA PNGs, and are
orientation-free, so we read with :mod:`sdconet.data.image_io` (the configured bands and scaling)
and add vertical flips and 90-degree rotations.
"""
import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.logger import log_every_n_seconds

from .augmentations import build_jitter_augmentations
from .image_io import read_image_any, read_options, to_uint8  # noqa: F401  (read_image_any, to_uint8: public here too)

logger = logging.getLogger(__name__)


class Rot90Transform(T.Transform):
    """Rotate by ``k`` x 90 degrees counter-clockwise, exactly (no interpolation)."""

    def __init__(self, h: int, w: int, k: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        return np.ascontiguousarray(np.rot90(img, self.k))

    def apply_coords(self, coords):
        coords = np.asarray(coords, dtype=np.float64).copy()
        h, w = self.h, self.w
        for _ in range(self.k % 4):  # one CCW quarter turn of an h x w image maps (x, y) -> (y, w - x)
            coords = np.stack([coords[:, 1], w - coords[:, 0]], axis=1)
            h, w = w, h
        return coords

    def apply_segmentation(self, segmentation):
        return self.apply_image(segmentation)

    def inverse(self):
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform(h, w, (4 - self.k) % 4)


class RandomRot90(T.Augmentation):
    """Rotate by a random multiple of 90 degrees (remote-sensing images have no "up")."""

    def get_transform(self, image):
        h, w = image.shape[:2]
        k = int(self._rand_range(0, 4))
        return Rot90Transform(h, w, k) if k else T.NoOpTransform()


class SDCoNetDatasetMapper:
    """Map a dataset dict to ``{"image": CHW uint8 tensor, "instances": Instances, ...}``.

    Boxes are clipped to the image; boxes smaller than ``min_box_size`` after clipping are
    dropped, and the running count of dropped boxes is logged.
    """

    @configurable
    def __init__(self, is_train: bool, *, augmentations, image_format="BGR", min_box_size=1.0, read_options=None):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.read_options = dict(read_options or {})  # bands / scaling of read_image_any
        self.min_box_size = min_box_size
        self.num_dropped = 0
        self.num_clipped = 0

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        augs = []
        if is_train:
            aug_cfg = cfg.INPUT.SDCONET
            if aug_cfg.HFLIP_PROB > 0:
                augs.append(T.RandomFlip(aug_cfg.HFLIP_PROB, horizontal=True, vertical=False))
            if aug_cfg.VFLIP_PROB > 0:
                augs.append(T.RandomFlip(aug_cfg.VFLIP_PROB, horizontal=False, vertical=True))
            if aug_cfg.ROT90:
                augs.append(RandomRot90())
            augs.extend(build_jitter_augmentations(cfg))  # scale / photometric jitter, off by default
        return {"is_train": is_train, "augmentations": augs, "image_format": cfg.INPUT.FORMAT,
                "min_box_size": cfg.INPUT.SDCONET.MIN_BOX_SIZE, "read_options": read_options(cfg)}

    def __call__(self, dataset_dict):
        image = read_image_any(dataset_dict["file_name"], format=self.image_format, **self.read_options)
        return self.map_image(dataset_dict, image)

    def map_image(self, dataset_dict, image):
        """Map a record whose image is already in memory (HxWx3 in INPUT.FORMAT), e.g. a mosaic
        (:mod:`.mosaic`): the augmentations and box handling of a tile read from its file."""
        dataset_dict = copy.deepcopy(dataset_dict)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        annos = [obj for obj in dataset_dict.pop("annotations", []) if obj.get("iscrowd", 0) == 0]
        dataset_dict["instances"] = self.annotations_to_instances(
            annos, transforms, (h, w), dataset_dict["file_name"])
        return dataset_dict

    def annotations_to_instances(self, annos, transforms, image_size, file_name):
        """Transform boxes with the image, clip them to it, drop degenerate ones (counted and logged)."""
        h, w = image_size
        boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
                         dtype=np.float64).reshape(-1, 4)
        classes = np.array([a["category_id"] for a in annos], dtype=np.int64)
        boxes = transforms.apply_box(boxes) if len(boxes) else boxes
        clipped = boxes.copy()
        clipped[:, 0::2] = clipped[:, 0::2].clip(0, w)
        clipped[:, 1::2] = clipped[:, 1::2].clip(0, h)
        self.num_clipped += int((np.abs(clipped - boxes) > 1e-6).any(axis=1).sum())
        keep = ((clipped[:, 2] - clipped[:, 0]) >= self.min_box_size) & (
            (clipped[:, 3] - clipped[:, 1]) >= self.min_box_size)
        dropped = int((~keep).sum())
        if dropped:
            self.num_dropped += dropped
            log_every_n_seconds(
                logging.WARNING,
                f"Dropped {dropped} degenerate box(es) (smaller than {self.min_box_size} px after clipping) "
                f"in {file_name}; {self.num_dropped} dropped so far by this mapper",
                n=10, name=__name__)
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.as_tensor(clipped[keep], dtype=torch.float32))
        instances.gt_classes = torch.as_tensor(classes[keep], dtype=torch.int64)
        return instances
