"""Scenes read tile by tile: GeoTIFF / JPEG 2000 by rasterio windows, other images decoded whole.

A :class:`WindowedScene` keeps only the open dataset: each tile is one ``dataset.read(window=...)``,
so memory does not grow with the scene. Its tiles hold exactly the pixels ``read_image_any`` gives
that part of the whole file (same bands, palette, 12/16-bit scaling, nodata set to 0), so the two
paths give the same detections. The one scene-wide quantity is the scaling range:

- "max" scaling is fixed (0..MAX_VALUE), nothing to compute;
- "percentile" scaling of integer data of up to 16 bits (the usual satellite product) counts every
  value in a first pass over 1024 x 1024 windows (a 65536-bin histogram) and takes the exact
  percentiles ``np.percentile`` would take over the whole scene;
- "percentile" scaling of float or 32-bit data uses a read decimated to at most
  ``STATS_SIDE`` px a side (nearest neighbour; exact for scenes no larger than that).

A :class:`ArrayScene` is the former path (PNG, JPEG...): the file decoded whole, tiles sliced.

Tiles without data are skipped: all pixels 0 after scaling (nodata values become 0), or all
masked by the file's mask (nodata, alpha band or internal mask, from ``read_masks``).
:func:`scene_stream` turns a list of scenes into the items a reader thread hands to the model.
"""
import os
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import cv2
import numpy as np
import torch

from ..data.image_io import RASTERIO_EXTENSIONS, _band_indexes, invalid_mask, read_image_any, stretch_bands
from .geo import dataset_georeference, read_georeference
from .tiling import Tile, read_tile, tile_grid

STATS_SIDE = 2048  # longest side of the decimated read that gives float data's percentiles
STATS_WINDOW = 1024  # side of the windows of the exact histogram pass


def percentiles_from_histogram(values: np.ndarray, counts: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """``np.percentile`` (method "linear") of the data whose distinct sorted ``values`` occur ``counts`` times.

    The same arithmetic as NumPy on the two order statistics around each position, in the data's
    dtype, so the result is bit-identical to ``np.percentile`` of the expanded data.
    """
    keep = counts > 0
    values, counts = values[keep], counts[keep]
    n = int(counts.sum())
    if n == 0:
        raise ValueError("no values")
    q = np.true_divide(np.asanyarray(percentiles), 100)
    virtual = (n - 1) * q
    previous = np.floor(virtual)
    gamma = virtual - previous
    ranks_lo = np.clip(previous, 0, n - 1).astype(np.int64)
    ranks_hi = np.clip(previous + 1, 0, n - 1).astype(np.int64)
    ends = np.cumsum(counts)
    a = values[np.searchsorted(ends, ranks_lo, side="right")]
    b = values[np.searchsorted(ends, ranks_hi, side="right")]
    diff = b - a
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe")
    return out


class ArrayScene:
    """A scene decoded whole (``read_image_any``); tiles are slices of the HxWx3 uint8 BGR array."""

    def __init__(self, path: str, image: np.ndarray, georeference=None):
        self.path, self.image, self.georeference = path, image, georeference
        self.height, self.width = image.shape[:2]

    def read(self, tile: Tile):
        """(CHW uint8 BGR tensor, whether the tile holds any non-zero pixel)."""
        return read_tile(self.image, tile), bool(self.image[tile.y0:tile.y1, tile.x0:tile.x1].any())

    def thumbnail(self, max_side: int):
        """(the scene at most ``max_side`` px a side, HxWx3 uint8 BGR; its scale)."""
        scale = min(1.0, max_side / max(self.height, self.width))
        if scale >= 1:
            return self.image, 1.0
        size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        return cv2.resize(self.image, size, interpolation=cv2.INTER_AREA), scale

    def close(self):
        self.image = None


class WindowedScene:
    """A raster read window by window with rasterio; same pixels as ``read_image_any`` of the whole file.

    Args: as :func:`sdconet.data.image_io.read_image_any` (format BGR). Raises ``IOError`` naming
    the file when it cannot be opened, lacks a band, or a window cannot be read.
    """

    def __init__(self, path: str, bands: Sequence[int] = (), scaling: str = "percentile",
                 percentiles: Sequence[float] = (0.0, 99.9), max_value: float = 0.0):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioError

        self.path = path
        if not os.path.isfile(path):
            reason = "it is a folder" if os.path.isdir(path) else "No such file or directory"
            raise IOError(f"Cannot read image file {path}: {reason}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._src = rasterio.open(path)
        except RasterioError as e:
            raise IOError(f"Cannot decode image file {path}: it is empty, truncated, corrupt or not an "
                          f"image ({e})") from e
        try:
            self._setup(bands, scaling, percentiles, max_value)
        except BaseException:
            self.close()
            raise

    def _setup(self, bands, scaling, percentiles, max_value):
        from rasterio.enums import ColorInterp, MaskFlags

        src = self._src
        self.height, self.width = src.height, src.width
        self.georeference = dataset_georeference(src)
        self._lut = None
        if not bands and src.count == 1 and src.colorinterp[0] == ColorInterp.palette:
            self._lut = np.zeros((256, 3), np.uint8)
            for index, rgba in src.colormap(1).items():
                self._lut[index] = rgba[:3]
            self._indexes = [1]
        else:
            self._indexes = _band_indexes(self.path, bands, src.count)
        self._dtype = np.dtype(src.dtypes[self._indexes[0] - 1])
        self._nodata = None if self._lut is not None else src.nodata
        self._masked = any(MaskFlags.all_valid not in src.mask_flag_enums[i - 1] for i in self._indexes)
        self._range = None
        if self._lut is None and self._dtype != np.uint8:
            self._range = self._scaling_range(scaling, percentiles, max_value)

    # ------------------------------------------------------------------ reading
    def _read(self, what: str, **kwargs) -> np.ndarray:
        from rasterio.errors import RasterioError

        try:
            return self._src.read(self._indexes, **kwargs)
        except RasterioError as e:
            raise IOError(f"Cannot read {what} of image file {self.path}: {e}") from e

    @staticmethod
    def _window(x0, y0, x1, y1):
        from rasterio.windows import Window

        return Window(x0, y0, x1 - x0, y1 - y0)

    def _scaling_range(self, scaling, percentiles, max_value):
        """(low, high) of ``to_uint8`` for the whole scene (see the module docstring)."""
        is_float = np.issubdtype(self._dtype, np.floating)
        if scaling == "max":
            low, high = 0.0, float(max_value) or (1.0 if is_float else float(np.iinfo(self._dtype).max))
        elif scaling == "percentile":
            if np.issubdtype(self._dtype, np.integer) and self._dtype.itemsize <= 2:
                low, high = self._histogram_percentiles(percentiles)
            else:
                low, high = self._sampled_percentiles(percentiles)
        else:
            raise ValueError(f"Unknown scaling {scaling!r}: use 'percentile' or 'max'")
        if not high > low:  # a flat image: its value becomes 0
            high = low + 1.0
        return low, high

    def _histogram_percentiles(self, percentiles):
        info = np.iinfo(self._dtype)
        counts = np.zeros(int(info.max) - int(info.min) + 1, np.int64)
        for y in range(0, self.height, STATS_WINDOW):
            for x in range(0, self.width, STATS_WINDOW):
                x1, y1 = min(x + STATS_WINDOW, self.width), min(y + STATS_WINDOW, self.height)
                data = self._read(f"window rows {y}:{y1}, cols {x}:{x1}", window=self._window(x, y, x1, y1))
                shifted = data.ravel() if info.min == 0 else data.astype(np.int32).ravel() - int(info.min)
                counts += np.bincount(shifted, minlength=len(counts))
        nodata = self._nodata
        if nodata is not None and np.isfinite(nodata) and float(nodata).is_integer() \
                and info.min <= nodata <= info.max:
            counts[int(nodata) - int(info.min)] = 0
        if not counts.any():
            return 0.0, 0.0
        values = np.arange(int(info.min), int(info.max) + 1).astype(self._dtype)
        return tuple(float(v) for v in percentiles_from_histogram(values, counts, percentiles))

    def _sampled_percentiles(self, percentiles):
        from rasterio.enums import Resampling

        scale = min(1.0, STATS_SIDE / max(self.height, self.width))
        shape = (len(self._indexes), max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        data = self._read("a decimated copy", out_shape=shape, resampling=Resampling.nearest)
        invalid = invalid_mask(data, self._nodata)
        valid = data[~invalid] if invalid is not None else data
        return tuple(float(v) for v in np.percentile(valid, percentiles)) if valid.size else (0.0, 0.0)

    def _to_bgr(self, data: np.ndarray) -> np.ndarray:
        """CxHxW raw bands -> 3xHxW uint8 BGR, as ``read_image_any`` (``to_uint8``, gray repeated)."""
        if self._lut is not None:
            return np.ascontiguousarray(self._lut[data[0]].transpose(2, 0, 1)[::-1])
        if self._range is not None:
            data = stretch_bands(data, *self._range, invalid_mask(data, self._nodata), axis=0)
        if data.shape[0] == 1:
            data = np.repeat(data, 3, axis=0)
        return np.ascontiguousarray(data[::-1])  # R, G, B -> B, G, R

    def read(self, tile: Tile):
        """(CHW uint8 BGR tensor of the tile, whether it holds data: a non-zero pixel not masked)."""
        where = f"window rows {tile.y0}:{tile.y1}, cols {tile.x0}:{tile.x1}"
        window = self._window(tile.x0, tile.y0, tile.x1, tile.y1)
        image = self._to_bgr(self._read(where, window=window))
        has_data = bool(image.any())
        if has_data and self._masked:
            from rasterio.errors import RasterioError

            try:
                has_data = bool(self._src.read_masks(self._indexes, window=window).any())
            except RasterioError as e:
                raise IOError(f"Cannot read the mask of {where} of image file {self.path}: {e}") from e
        return torch.from_numpy(image), has_data

    def thumbnail(self, max_side: int):
        """(the scene at most ``max_side`` px a side, HxWx3 uint8 BGR, averaged; its scale)."""
        from rasterio.enums import Resampling

        scale = min(1.0, max_side / max(self.height, self.width))
        shape = (len(self._indexes), max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        resampling = Resampling.nearest if self._lut is not None else Resampling.average
        data = self._read("a downscaled copy", out_shape=shape, resampling=resampling)
        return np.ascontiguousarray(self._to_bgr(data).transpose(1, 2, 0)), scale

    def close(self):
        src, self._src = getattr(self, "_src", None), None
        if src is not None:
            src.close()


# GDAL keeps decoded blocks in a process-wide cache of 5% of RAM by default: reading a scene window by
# window would then hold every block of it, and memory would grow with the scene (+900 MB for a
# 16384 px RGB scene). 128 MiB holds the blocks under a row of tiles of scenes up to ~40 000 px wide
# (512 px blocks), so a block shared by two rows of tiles is still decoded once.
BLOCK_CACHE_BYTES = 128 * 2**20


def bounded_block_cache(max_bytes: int = BLOCK_CACHE_BYTES):
    """A ``rasterio.Env`` capping GDAL's block cache (for every thread: the cache is process-wide) while
    scenes are read by windows; the previous size comes back on exit."""
    import rasterio

    return rasterio.Env(GDAL_CACHEMAX=max_bytes)


def open_scene(path: str, whole: bool = False, **read_options):
    """A :class:`WindowedScene` for rasterio formats (.tif, .tiff, .jp2, .j2k), else (or with
    ``whole``) an :class:`ArrayScene` of the file decoded by ``read_image_any``. ``read_options``:
    bands, scaling, percentiles, max_value (``sdconet.data.image_io.read_options(cfg)``)."""
    if whole or os.path.splitext(path)[1].lower() not in RASTERIO_EXTENSIONS:
        image = read_image_any(path, format="BGR", **read_options)
        return ArrayScene(path, image, read_georeference(path))
    return WindowedScene(path, **read_options)


# ---------------------------------------------------------------------- the stream of a list of scenes
@dataclass
class SceneStart:
    """A scene opened: its size, georeference and tile grid (the dataset stays in the reader thread)."""

    index: int
    path: str
    height: int
    width: int
    georeference: Any
    tiles: List[Tile]


@dataclass
class TileBatch:
    """Up to ``batch`` tiles holding data, in grid order, with their CHW uint8 BGR tensors."""

    tiles: List[Tile]
    images: List[torch.Tensor]


@dataclass
class SceneEnd:
    """The scene's last tile was read: a small copy to draw the detections on and its scale (``None``
    and 0 when no drawing was asked for)."""

    index: int
    thumbnail: Optional[np.ndarray]
    scale: float


@dataclass
class SceneFailed:
    """The scene could not be opened or read (the error names the file); its earlier batches are void."""

    index: int
    path: str
    error: OSError


def scene_stream(jobs, open_fn, tile: int, overlap: int, batch: int, thumbnail_side: Optional[int]):
    """For each (index, path) of ``jobs``: SceneStart, TileBatch..., SceneEnd, or SceneFailed.

    ``thumbnail_side`` None: no copy to draw on is read (the SceneEnd's thumbnail is None).

    ``open_fn(path)`` opens a scene (e.g. :func:`open_scene` with the read options). An
    ``OSError`` while opening or reading ends that scene with SceneFailed and the stream goes on
    with the next one; any other error ends the stream.
    """
    for index, path in jobs:
        try:
            scene = open_fn(path)
        except OSError as e:
            yield SceneFailed(index, path, e)
            continue
        try:
            tiles = tile_grid(scene.height, scene.width, tile, overlap)
            yield SceneStart(index, path, scene.height, scene.width, scene.georeference, tiles)
            chunk, images = [], []
            for t in tiles:
                image, has_data = scene.read(t)
                if has_data:
                    chunk.append(t)
                    images.append(image)
                if len(chunk) == batch:
                    yield TileBatch(chunk, images)
                    chunk, images = [], []
            if chunk:
                yield TileBatch(chunk, images)
            yield SceneEnd(index, *(scene.thumbnail(thumbnail_side) if thumbnail_side else (None, 0.0)))
        except OSError as e:
            yield SceneFailed(index, path, e)
        finally:
            scene.close()
