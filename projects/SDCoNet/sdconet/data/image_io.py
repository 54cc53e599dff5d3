"""Read any remote-sensing image file as an HxWx3 uint8 array in the model's channel order.

TIFF / GeoTIFF / JPEG 2000 go through rasterio (GDAL): OpenCV decodes a 16-bit multi-band
GeoTIFF as one gray band and refuses files of five or more bands, which is exactly what satellite
scenes are. PNG, JPEG, BMP... go through OpenCV as detectron2 users expect; any other file OpenCV
cannot decode gets a second try with rasterio.

Bands are numbered from 1 in file order, which for colour files is R, G, B(, A): ``bands``
lists the bands to show as (R, G, B), or a single band to show as gray. 8-bit data is used as
it is; 12/16-bit, signed and float data is scaled to 0-255 (see :func:`to_uint8`).
"""
import os
import warnings
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

# Read with rasterio first (OpenCV reads multi-band / 16-bit TIFFs wrong or not at all).
RASTERIO_EXTENSIONS = (".tif", ".tiff", ".jp2", ".j2k")
# OpenCV's own formats: when OpenCV cannot decode one, the file is broken (GDAL would return a
# truncated PNG zero-filled instead of failing), so rasterio gets no second try.
OPENCV_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".webp", ".pbm", ".pgm", ".ppm", ".pnm")
SCALINGS = ("percentile", "max")


def read_options(cfg) -> dict:
    """The keyword arguments of :func:`read_image_any` configured in ``cfg.INPUT.SDCONET``."""
    c = cfg.INPUT.SDCONET
    return {"bands": tuple(c.BANDS), "scaling": c.SCALING, "percentiles": tuple(c.PERCENTILES),
            "max_value": float(c.MAX_VALUE)}


def to_uint8(image: np.ndarray, scaling: str = "percentile", percentiles: Sequence[float] = (0.0, 99.9),
             max_value: float = 0.0, nodata: Optional[float] = None) -> np.ndarray:
    """Scale an HxWxC image of any dtype to uint8; uint8 input is returned as is.

    "percentile" maps the ``percentiles`` (low, high) of the data to 0 and 255: sensors often
    fill only 10-12 of 16 bits, so dividing by 65535 would give a black image. "max" maps
    0..``max_value`` to 0..255 (0 = the dtype's maximum, 1.0 for float data): fixed, so every
    scene and tile of a sensor gets the same brightness (e.g. 4095 for 12-bit data).

    One (low, high) serves all bands together (a joint stretch): it keeps the ratios between
    bands, so colours stay those of the sensor as in 8-bit imagery. A per-band stretch would
    change the colour balance scene by scene (a bluish haze turned neutral, a red roof shifted)
    and the same object would look different to the model from one scene to the next.
    Non-finite values and ``nodata`` are left out of the percentiles and become 0.
    """
    if image.dtype == np.uint8:
        return image
    if image.ndim == 2:
        return to_uint8(image[:, :, None], scaling, percentiles, max_value, nodata)[:, :, 0]
    if scaling not in SCALINGS:
        raise ValueError(f"Unknown scaling {scaling!r}: use one of {SCALINGS}")
    is_float = np.issubdtype(image.dtype, np.floating)
    if image.dtype == bool:
        image = image.astype(np.uint8)
    invalid = invalid_mask(image, nodata)
    if scaling == "max":
        low = 0.0
        high = float(max_value) or (1.0 if is_float else float(np.iinfo(image.dtype).max))
    else:
        valid = image[~invalid] if invalid is not None else image
        low, high = (float(v) for v in np.percentile(valid, percentiles)) if valid.size else (0.0, 0.0)
    if not high > low:  # a flat image: its value becomes 0
        high = low + 1.0
    return stretch_bands(image, low, high, invalid, axis=2)


def invalid_mask(image: np.ndarray, nodata: Optional[float]) -> Optional[np.ndarray]:
    """Pixels left out of the stretch (they become 0): non-finite floats and ``nodata``; None: none."""
    is_float = np.issubdtype(image.dtype, np.floating)
    if not (is_float or nodata is not None):
        return None
    invalid = ~np.isfinite(image) if is_float else np.zeros(image.shape, bool)
    if nodata is not None and np.isfinite(nodata):
        invalid |= image == nodata
    return invalid


def stretch_bands(image: np.ndarray, low: float, high: float, invalid: Optional[np.ndarray] = None,
                  axis: int = 2) -> np.ndarray:
    """Map ``low``..``high`` to 0..255 as uint8, ``invalid`` pixels to 0, band by band along ``axis``
    (float temporaries of one band only). Shared by :func:`to_uint8` and the windowed scene reader,
    so a tile read by window has the pixels of the same slice of the whole image."""
    scale = np.float32(255.0 / (high - low))
    out = np.empty(image.shape, np.uint8)
    for c in range(image.shape[axis]):
        index = (slice(None),) * axis + (c,)
        band = (image[index].astype(np.float32) - np.float32(low)) * scale
        if invalid is not None:
            band[invalid[index]] = 0.0
        out[index] = np.clip(np.rint(band), 0, 255)
    return out


def _read_rasterio(file_name: str, bands: Sequence[int]) -> Tuple[np.ndarray, Optional[float]]:
    """(HxWxC array of the requested bands, nodata); bands () = the first three, or the first as gray."""
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(file_name) as src:
                count = src.count
                if not bands and count == 1 and src.colorinterp[0] == ColorInterp.palette:
                    lut = np.zeros((256, 3), np.uint8)
                    for index, rgba in src.colormap(1).items():
                        lut[index] = rgba[:3]
                    return lut[src.read(1)], None  # palette colours, in R, G, B order
                indexes = _band_indexes(file_name, bands, count)
                return src.read(indexes).transpose(1, 2, 0), src.nodata
    except RasterioError as e:
        raise IOError(f"Cannot decode image file {file_name}: it is empty, truncated, corrupt or not an "
                      f"image ({e})") from e


def _read_opencv(file_name: str, bands: Sequence[int]) -> Optional[np.ndarray]:
    """HxWxC array of the requested bands in R, G, B order, or ``None`` when OpenCV cannot decode the file."""
    try:
        data = np.fromfile(file_name, dtype=np.uint8)
    except OSError as e:
        raise IOError(f"Cannot read image file {file_name}: {e.strerror or e}") from e
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error as e:  # e.g. more pixels than OpenCV's CV_IO_MAX_IMAGE_PIXELS
        raise IOError(f"Cannot decode image file {file_name}: {e.err}") from e
    if image is None:
        return None
    if image.ndim == 2:
        image = image[:, :, None]
    count = image.shape[2]
    # OpenCV stores colour as B, G, R(, A): file band b (R=1, G=2, B=3, A=4) is channel b-1 reversed.
    channel = [2, 1, 0, 3] if count in (3, 4) else list(range(count))
    indexes = [channel[b - 1] for b in _band_indexes(file_name, bands, count)]
    if indexes == [2, 1, 0] and count == 3:
        return image[:, :, ::-1]  # a view: the caller's final BGR reversal makes it the decoded array again
    return image if indexes == [0] and count == 1 else image[:, :, indexes]


def _band_indexes(file_name: str, bands: Sequence[int], count: int) -> list:
    """1-based band numbers to read: ``bands``, or (1, 2, 3) / (1,) by default; checked against ``count``."""
    if not bands:
        return [1, 2, 3] if count >= 3 else [1]
    missing = [b for b in bands if not 1 <= b <= count]
    if missing:
        raise IOError(f"Cannot read bands {tuple(bands)} of image file {file_name}: it has {count} band(s), "
                      f"so band(s) {missing} do not exist")
    return list(bands)


def read_image_any(file_name: str, format: str = "BGR", bands: Sequence[int] = (), scaling: str = "percentile",
                   percentiles: Sequence[float] = (0.0, 99.9), max_value: float = 0.0) -> np.ndarray:
    """Read an image file as HxWx3 uint8 in ``format`` ("BGR" or "RGB").

    Args:
        bands: 1-based band numbers shown as (R, G, B), or one band shown as gray; () = the first
            three bands, or the first band as gray for one- and two-band files.
        scaling, percentiles, max_value: how non-8-bit data becomes 0-255, see :func:`to_uint8`.

    Raises ``IOError`` naming the file when it is missing, empty, truncated, not an image or
    lacks a requested band.
    """
    if format not in ("BGR", "RGB"):
        raise ValueError(f"Unsupported image format {format!r}: use BGR or RGB")
    if not os.path.isfile(file_name):
        reason = "it is a folder" if os.path.isdir(file_name) else "No such file or directory"
        raise IOError(f"Cannot read image file {file_name}: {reason}")
    ext = os.path.splitext(file_name)[1].lower()
    nodata = None
    image = None if ext in RASTERIO_EXTENSIONS else _read_opencv(file_name, bands)
    if image is None:
        if ext in OPENCV_EXTENSIONS or os.path.getsize(file_name) == 0:
            raise IOError(f"Cannot decode image file {file_name}: it is empty, truncated, corrupt or not an image")
        image, nodata = _read_rasterio(file_name, bands)
    image = to_uint8(image, scaling, percentiles, max_value, nodata)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    # image is in R, G, B order here
    return np.ascontiguousarray(image[:, :, ::-1] if format == "BGR" else image)
