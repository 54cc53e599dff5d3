"""``Predictor``: a trained SDCoNet on single images and on scenes of any size (tiled).

Memory of :meth:`Predictor.predict_large` is bounded by the tile batch: the scene stays a numpy
array and only ``batch`` tiles at a time become tensors on the device.
"""
import logging
from typing import Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from tqdm import tqdm

from ..config import get_sdconet_cfg
from ..data.image_io import read_image_any, read_options
from ..engine.checkpoint import AtomicDetectionCheckpointer
from .tiling import merge_tile_detections, read_tile, tile_grid

logger = logging.getLogger(__name__)
ImageLike = Union[str, np.ndarray]


def _pick_device(requested: Optional[str], cfg: CfgNode) -> torch.device:
    name = requested or cfg.MODEL.DEVICE
    if name.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on CPU")
        name = "cpu"
    return torch.device(name)


class Predictor:
    """Run SDCoNet on images given as file paths or HxWx3 uint8 BGR arrays.

    File paths are read as in training, with the config's INPUT.SDCONET.BANDS / SCALING
    (see :meth:`read_image`).

    Args:
        cfg_or_path: a config (``CfgNode``) or the path of a yaml config.
        weights: checkpoint path (or URL) loaded with ``AtomicDetectionCheckpointer`` (a damaged file is named); ``None`` or ""
            keeps the freshly initialised weights (tests, smoke runs).
        device: "cpu", "cuda", "cuda:1"...; ``None`` = ``MODEL.DEVICE`` (CPU if CUDA is missing).
        opts: extra config overrides, e.g. ``["MODEL.SDCONET.DEGRADE.TEST", "False"]``.
        score_thresh: detections below it are dropped (default keeps all top-k detections).
    """

    def __init__(self, cfg_or_path, weights=None, device=None, opts=(), score_thresh: float = 0.0):
        # MODEL.WEIGHTS tells the backbone build that a full checkpoint follows, so a paper
        # config needs no ImageNet Swin file ($SDCONET_WEIGHTS) just to predict.
        self.cfg = get_sdconet_cfg(cfg_or_path, [*opts, *(["MODEL.WEIGHTS", str(weights)] if weights else [])])
        self.device = _pick_device(device, self.cfg)
        self.model = build_model(self.cfg).to(self.device).eval()
        if weights:
            AtomicDetectionCheckpointer(self.model).load(weights)
        self.score_thresh = float(score_thresh)

    def read_image(self, path: str) -> np.ndarray:
        """The file as the model sees it: HxWx3 uint8 BGR, with the configured bands and scaling.

        Raises ``IOError`` naming the file when it cannot be read.
        """
        return read_image_any(path, format="BGR", **read_options(self.cfg))

    def _as_image(self, image: ImageLike) -> np.ndarray:
        if isinstance(image, str):
            return self.read_image(image)
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 BGR array, got shape {image.shape} and dtype {image.dtype}")
        return image

    @torch.no_grad()
    def predict_tiles(self, images: Sequence[torch.Tensor], score_thresh: float):
        """Detections (boxes, scores, classes) on CPU, in each image's pixels, above the threshold, for a
        batch of CHW uint8 BGR tensors (what the tiled and windowed scene paths feed)."""
        inputs = [{"image": im, "height": im.shape[1], "width": im.shape[2]} for im in images]
        outputs = []
        for out in self.model(inputs):
            inst = out["instances"].to("cpu")
            keep = inst.scores >= score_thresh
            outputs.append((inst.pred_boxes.tensor[keep], inst.scores[keep], inst.pred_classes[keep]))
        return outputs

    def __call__(self, image: ImageLike) -> Instances:
        """Detect on one image as a whole; returns ``Instances`` (pred_boxes, scores, pred_classes) in its pixels."""
        image = self._as_image(image)
        boxes, scores, classes = self.predict_tiles([torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))],
                                          self.score_thresh)[0]
        return _instances(image.shape[:2], boxes, scores, classes)

    def predict_large(self, image: ImageLike, tile: int = 512, overlap: int = 128, batch: int = 4,
                      nms_iou: Optional[float] = 0.5, score_thresh: Optional[float] = None,
                      progress: bool = False) -> Instances:
        """Sliding-window detection on a scene of any size (see :mod:`sdconet.inference.tiling`).

        Tiles of ``tile`` px overlapping by ``overlap`` px (choose it larger than the largest object)
        run ``batch`` at a time; boxes go back to scene pixels, each tile keeps those centred in
        its core region, and boxes crossing a core border are merged with class-wise NMS at
        ``nms_iou``. A scene no larger than one tile gives exactly ``self(image)``.
        """
        if not (isinstance(batch, int) and batch >= 1):
            raise ValueError(f"batch (tiles per forward pass) must be an integer >= 1, got {batch!r}")
        image = self._as_image(image)
        height, width = image.shape[:2]
        tiles = tile_grid(height, width, tile, overlap)
        thresh = self.score_thresh if score_thresh is None else float(score_thresh)
        per_tile = []
        with tqdm(total=len(tiles), desc="tiles", unit="tile", disable=not progress, leave=False) as bar:
            for start in range(0, len(tiles), batch):
                chunk = tiles[start:start + batch]
                per_tile.extend(self.predict_tiles([read_tile(image, t) for t in chunk], thresh))
                bar.update(len(chunk))
        boxes, scores, classes = merge_tile_detections(per_tile, tiles, nms_iou)
        return _instances((height, width), boxes, scores, classes)


def _instances(image_size, boxes, scores, classes) -> Instances:
    inst = Instances(tuple(image_size))
    inst.pred_boxes = Boxes(boxes)
    inst.scores = scores
    inst.pred_classes = classes
    return inst
