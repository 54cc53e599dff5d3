"""Random scale (large-scale jitter) and photometric jitter for the training mapper.

detectron2 has most of the pieces (``ResizeScale``, ``FixedSizeCrop``, ``RandomBrightness``,
``RandomContrast``, ``RandomSaturation``); what is added here is what tiles need:

- the jitter's target size is each image's own size, so the output keeps the tile size and batches
  keep one size (the HR tile is also the SR target);
- the crop offset is drawn independently along x and y: ``FixedSizeCrop`` draws one number for both,
  so its crops of a square tile only slide along the diagonal and never show two of its corners;
- saturation weighs the channels in the image's own order: detectron2 assumes RGB, our images are
  BGR unless ``INPUT.FORMAT`` says otherwise;
- a hue shift, which detectron2 lacks.
"""
import cv2
import numpy as np
from detectron2.data import transforms as T
from PIL import Image

GRAY_WEIGHTS_RGB = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as in detectron2's RandomSaturation


def gray_weights(image_format: str):
    """The luma weights in the channel order of ``image_format`` ("BGR" or "RGB")."""
    return GRAY_WEIGHTS_RGB if image_format == "RGB" else GRAY_WEIGHTS_RGB[::-1]


class JitterCrop(T.FixedSizeCrop):
    """detectron2's ``FixedSizeCrop`` (random crop of a larger image, pad a smaller one on the right
    and bottom), with the crop offset drawn independently along y and x."""

    def _get_crop(self, image):
        input_size = image.shape[:2]
        max_offset = np.maximum(np.subtract(input_size, self.crop_size), 0)
        offset = np.round(max_offset * np.random.uniform(0.0, 1.0, size=2)).astype(int)
        return T.CropTransform(offset[1], offset[0], self.crop_size[1], self.crop_size[0],
                               input_size[1], input_size[0])


class RandomScaleJitter(T.Augmentation):
    """Large-scale jitter of a tile: resize by a random factor in ``[min_scale, max_scale]`` keeping the
    aspect ratio (detectron2's ``ResizeScale`` with the image's own size as target), then take a random
    window of the input size from a larger result or pad a smaller one on the right and bottom with
    ``pad_value``. The output has the input's size; boxes cut by the crop are left to the mapper,
    which clips them and drops (and counts) those that become too small."""

    def __init__(self, min_scale: float, max_scale: float, pad_value: float = 0.0, interp=Image.BILINEAR):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        resize = T.ResizeScale(self.min_scale, self.max_scale, h, w, self.interp).get_transform(image)
        resized = np.empty((resize.new_h, resize.new_w, 0), image.dtype)  # the crop reads only the shape
        crop_pad = JitterCrop((h, w), pad=True, pad_value=self.pad_value).get_transform(resized)
        return T.TransformList([resize, *crop_pad.transforms])


class RandomSaturation(T.RandomSaturation):
    """detectron2's ``RandomSaturation`` (blend with the gray image by a random factor) with the gray
    weights in the image's channel order instead of always RGB's."""

    def __init__(self, intensity_min: float, intensity_max: float, image_format: str = "BGR"):
        super().__init__(intensity_min, intensity_max)
        self.image_format = image_format

    def get_transform(self, image):
        w = np.random.uniform(self.intensity_min, self.intensity_max)
        gray = image.dot(gray_weights(self.image_format))[:, :, np.newaxis]
        return T.BlendTransform(src_image=gray, src_weight=1 - w, dst_weight=w)


class HueShiftTransform(T.Transform):
    """Rotate the hue of an HxWx3 uint8 image by ``delta`` of the hue circle (OpenCV's 8-bit HSV, where
    the hue takes 180 steps of 2 degrees); coordinates are unchanged."""

    def __init__(self, delta: float, image_format: str = "BGR"):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, "needs an HxWx3 uint8 image"
        rgb = self.image_format == "RGB"
        hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV if rgb else cv2.COLOR_BGR2HSV)
        lut = ((np.arange(256) + self.steps) % 180).astype(np.uint8)  # hue values are 0..179
        hsv[:, :, 0] = lut[hsv[:, :, 0]]
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB if rgb else cv2.COLOR_HSV2BGR)

    @property
    def steps(self) -> int:
        """The shift in OpenCV hue steps (0..179)."""
        return int(round(self.delta * 180)) % 180

    def apply_coords(self, coords):
        return coords

    def apply_segmentation(self, segmentation):
        return segmentation

    def inverse(self):
        return HueShiftTransform(-self.delta, self.image_format)


class RandomHue(T.Augmentation):
    """Shift the hue by a random fraction of the hue circle in ``[-max_delta, max_delta]``."""

    def __init__(self, max_delta: float, image_format: str = "BGR"):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        tfm = HueShiftTransform(self._rand_range(-self.max_delta, self.max_delta), self.image_format)
        # No shift: skip the lossy round trip through 8-bit HSV.
        return tfm if tfm.steps else T.NoOpTransform()


def build_jitter_augmentations(cfg):
    """The photometric and scale jitter of ``cfg.INPUT.SDCONET`` (each off by default), in this order:
    brightness, contrast, saturation, hue, then scale, so that padded areas stay exactly black."""
    aug_cfg, image_format = cfg.INPUT.SDCONET, cfg.INPUT.FORMAT
    augs = []
    if aug_cfg.BRIGHTNESS > 0:
        augs.append(T.RandomBrightness(1 - aug_cfg.BRIGHTNESS, 1 + aug_cfg.BRIGHTNESS))
    if aug_cfg.CONTRAST > 0:
        augs.append(T.RandomContrast(1 - aug_cfg.CONTRAST, 1 + aug_cfg.CONTRAST))
    if aug_cfg.SATURATION > 0:
        augs.append(RandomSaturation(1 - aug_cfg.SATURATION, 1 + aug_cfg.SATURATION, image_format))
    if aug_cfg.HUE > 0:
        augs.append(RandomHue(aug_cfg.HUE, image_format))
    if tuple(aug_cfg.SCALE_JITTER) != (1.0, 1.0):
        augs.append(RandomScaleJitter(*aug_cfg.SCALE_JITTER, pad_value=0.0))
    return augs
