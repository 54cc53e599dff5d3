"""Mosaic of four training tiles, as a map-style dataset in front of :class:`.mapper.SDCoNetDatasetMapper`.

A mosaic shows the sampled tile and three random ones in the four corners of a canvas the size of
the sampled tile, around a random centre. Each tile keeps its full resolution and only the part
that falls into its corner is shown (the tiles are cropped, not shrunk): halving every tile so
that four fit would halve objects that are already a few pixels wide, the very ones this model is
for. Boxes are shifted with their tile and clipped to its corner exactly; boxes wholly outside it
are left out and counted. The result then goes through the mapper's usual augmentations and box
handling (:meth:`.mapper.SDCoNetDatasetMapper.map_image`), so a mosaic is flipped, rotated and
filtered like any tile.

:class:`MosaicDataset` is indexed by ``(index, position)`` pairs, as
``engine.trainer.ResumableTrainingSampler(with_positions=True)`` yields them: ``position`` is the
sample's place in the stream shared by all ranks, so ``position // SOLVER.IMS_PER_BATCH`` is the
iteration that will consume it. That is what lets loader workers and every DDP rank, which never
see the trainer's iteration, switch mosaics off for the last INPUT.SDCONET.MOSAIC_OFF_LAST of
training (the model ends on whole tiles, as it sees them at test time). All draws of a sample
(mosaic or not, partners, centre, and the mapper's own flips) come from an RNG seeded by
(seed, position): batches are the same for any DATALOADER.NUM_WORKERS, and a resumed run sees what
an uninterrupted one would.
"""
import contextlib
import random
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data.common import DatasetFromList
from detectron2.structures import BoxMode

from .image_io import read_image_any

# The centre is drawn uniformly in this part of the canvas's width and height: every corner then
# shows at least a quarter of a tile's width and height.
CENTRE_RANGE = (0.25, 0.75)


class MosaicPlan(NamedTuple):
    """What one mosaic sample is made of: dataset indices (top-left, top-right, bottom-left,
    bottom-right; the first is the sampled one) and the centre ``(x, y)`` in canvas pixels."""

    indices: Tuple[int, int, int, int]
    centre: Tuple[int, int]


def mosaic_layout(canvas_hw: Tuple[int, int], centre: Tuple[int, int], tile_hws: Sequence[Tuple[int, int]]):
    """For each of the 4 tiles: its offset ``(x, y)`` on the canvas and its corner ``(x0, y0, x1, y1)``.

    Each tile touches the centre with its inner corner (the top-left tile with its bottom-right
    corner, ...), so the centre lines are tile borders and only the canvas edges cut into a tile.
    """
    h, w = canvas_hw
    xc, yc = centre
    (h0, w0), (h1, _), (_, w2), _ = tile_hws
    offsets = [(xc - w0, yc - h0), (xc, yc - h1), (xc - w2, yc), (xc, yc)]
    corners = [(0, 0, xc, yc), (xc, 0, w, yc), (0, yc, xc, h), (xc, yc, w, h)]
    return list(zip(offsets, corners))


def place_mosaic(images: Sequence[np.ndarray], annotations: Sequence[List[dict]], canvas_hw: Tuple[int, int],
                 centre: Tuple[int, int], fill=0):
    """Paste 4 HxWxC images around ``centre`` on a ``canvas_hw`` canvas and move their annotations.

    Returns ``(canvas, annotations, num_cut, num_outside)``: the annotations in ``XYXY_ABS``,
    shifted with their tile and clipped to its corner (``num_cut`` of them were clipped);
    ``num_outside`` boxes lay wholly outside their corner and are left out. A tile smaller than
    its corner leaves ``fill`` around it.
    """
    h, w = canvas_hw
    canvas = np.empty((h, w, images[0].shape[2]), dtype=images[0].dtype)
    canvas[...] = np.asarray(fill, dtype=images[0].dtype)
    out, num_cut, num_outside = [], 0, 0
    layout = mosaic_layout(canvas_hw, centre, [im.shape[:2] for im in images])
    for image, annos, ((ox, oy), (qx0, qy0, qx1, qy1)) in zip(images, annotations, layout):
        th, tw = image.shape[:2]
        x0, y0, x1, y1 = max(qx0, ox), max(qy0, oy), min(qx1, ox + tw), min(qy1, oy + th)
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = image[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        for anno in annos:
            box = np.asarray(BoxMode.convert(list(anno["bbox"]), anno["bbox_mode"], BoxMode.XYXY_ABS), np.float64)
            box += (ox, oy, ox, oy)
            if box[2] <= qx0 or box[0] >= qx1 or box[3] <= qy0 or box[1] >= qy1:
                num_outside += 1
                continue
            clipped = box.clip((qx0, qy0, qx0, qy0), (qx1, qy1, qx1, qy1))
            num_cut += bool((np.abs(clipped - box) > 1e-6).any())
            out.append({**anno, "bbox": clipped.tolist(), "bbox_mode": BoxMode.XYXY_ABS})
    return canvas, out, num_cut, num_outside


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed numpy's, Python's and torch's CPU global RNGs (detectron2's augmentations draw from
    numpy's) for the block, then give back the states they had."""
    states = np.random.get_state(), random.getstate(), torch.default_generator.get_state()
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(states[0])
        random.setstate(states[1])
        torch.default_generator.set_state(states[2])


class MosaicDataset(torch.utils.data.Dataset):
    """The training records mapped by ``mapper``, a fraction ``prob`` of them as 4-tile mosaics.

    Index it with ``(index, position)`` (see the module docstring); the dataset maps its samples
    itself, so the loader gets no mapper. ``num_cut`` / ``num_outside`` count the boxes the
    mosaic clipped / left out (in this process); boxes clipped below the mapper's
    ``min_box_size`` are dropped and counted by the mapper.

    Args:
        dataset: the records (a list or ``DatasetFromList``).
        mapper: an :class:`.mapper.SDCoNetDatasetMapper`; its reading options read the tiles.
        prob: probability that a sample becomes a mosaic.
        ims_per_batch: images per iteration over all ranks (SOLVER.IMS_PER_BATCH).
        off_iter: first iteration without mosaics (None: never off).
        seed: seeds every sample's draws with its position (the same on all ranks).
        fill: pixel value where a tile smaller than the canvas leaves a gap.
    """

    @configurable
    def __init__(self, dataset, mapper, *, prob: float, ims_per_batch: int, off_iter: Optional[int] = None,
                 seed: int = 0, fill=0):
        self.dataset = DatasetFromList(dataset, copy=False) if isinstance(dataset, list) else dataset
        self.mapper = mapper
        self.prob, self.ims_per_batch, self.off_iter = prob, ims_per_batch, off_iter
        self.seed = int(seed)
        self.fill = fill
        self.num_cut = 0
        self.num_outside = 0

    @classmethod
    def from_config(cls, cfg, dataset, mapper, seed: int = 0):
        c = cfg.INPUT.SDCONET
        max_iter = cfg.SOLVER.MAX_ITER
        return {"dataset": dataset, "mapper": mapper, "prob": c.MOSAIC_PROB, "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
                "off_iter": max_iter - int(round(max_iter * c.MOSAIC_OFF_LAST)), "seed": seed,
                # Gaps look like batch padding to the model, which pads normalised images with 0.
                "fill": tuple(int(round(v)) for v in cfg.MODEL.PIXEL_MEAN)}

    def __len__(self):
        return len(self.dataset)

    def iteration_of(self, position: int) -> int:
        return position // self.ims_per_batch

    def _seeds(self, position: int) -> Tuple[int, int]:
        plan, augment = np.random.SeedSequence([self.seed, position]).generate_state(2)
        return int(plan), int(augment)

    def plan(self, index: int, position: int) -> Optional[MosaicPlan]:
        """The mosaic the sample at ``position`` becomes, or None for the plain tile ``index``."""
        rng = np.random.default_rng(self._seeds(position)[0])
        wanted = rng.random() < self.prob  # drawn every time, so the switch-off changes no other draw
        partners = rng.integers(0, len(self), size=3)
        fx, fy = rng.uniform(*CENTRE_RANGE, size=2)
        if not wanted or (self.off_iter is not None and self.iteration_of(position) >= self.off_iter):
            return None
        record = self.dataset[index]
        centre = (int(round(fx * record["width"])), int(round(fy * record["height"])))
        return MosaicPlan((int(index), *(int(i) for i in partners)), centre)

    def read(self, record) -> np.ndarray:
        """A tile as the mapper reads it (same format and band / bit-depth options)."""
        image = read_image_any(record["file_name"], format=self.mapper.image_format, **self.mapper.read_options)
        utils.check_image_size(record, image)
        return image

    def mosaic(self, plan: MosaicPlan) -> dict:
        """Read the plan's tiles, place them and map the result; the record is the first tile's,
        with the mosaic's annotations and ``"mosaic"``: the 4 dataset indices."""
        records = [self.dataset[i] for i in plan.indices]
        images = [self.read(r) for r in records]
        canvas, annos, num_cut, num_outside = place_mosaic(
            images, [r.get("annotations", []) for r in records], images[0].shape[:2], plan.centre, self.fill)
        self.num_cut += num_cut
        self.num_outside += num_outside
        record = {**records[0], "annotations": annos, "mosaic": plan.indices}
        return self.mapper.map_image(record, canvas)

    def __getitem__(self, item):
        if not isinstance(item, (tuple, list)):
            raise TypeError(f"MosaicDataset is indexed by (index, position) pairs, got {item!r}: use "
                            f"ResumableTrainingSampler(with_positions=True)")
        index, position = (int(v) for v in item)
        with seeded_global_rngs(self._seeds(position)[1]):
            plan = self.plan(index, position)
            return self.mapper(self.dataset[index]) if plan is None else self.mosaic(plan)
