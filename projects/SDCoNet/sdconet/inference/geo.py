"""Detections as GeoJSON: map coordinates for georeferenced rasters, pixel coordinates otherwise.

Boxes are in continuous pixel coordinates (pixel (col, row) covers [col, col+1) x [row, row+1)),
which is exactly the convention of a raster's affine transform (it maps the top-left corner of
pixel (col, row) to map coordinates), so a corner (x, y) maps to ``transform @ (x, y)``.
"""
from typing import Optional, Sequence

import numpy as np


def read_georeference(path: str):
    """(affine transform, CRS) of a georeferenced raster, or ``None`` for plain images / no CRS."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return dataset_georeference(src)
    except RasterioIOError:
        return None


def dataset_georeference(src):
    """(affine transform, CRS) of an open rasterio dataset, or ``None`` when it has no CRS."""
    return None if src.crs is None else (src.transform, src.crs)


def _crs_member(crs) -> dict:
    """The (2008 GeoJSON) "crs" member naming the CRS, as GDAL / QGIS read it."""
    epsg = crs.to_epsg()
    name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg is not None else crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


def detections_to_geojson(boxes, scores, classes, class_names: Sequence[str], transform=None, crs=None,
                          image_file: Optional[str] = None) -> dict:
    """A FeatureCollection with one polygon (the box's four corners, closed) per detection.

    Args:
        boxes: (N, 4) xyxy in image pixels; scores (N,); classes (N,) contiguous ids.
        transform: ``affine.Affine`` pixel -> map; ``None`` keeps pixel coordinates (x right, y down).
        crs: ``rasterio`` CRS of ``transform`` (written as the "crs" member).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    features = []
    for (x0, y0, x1, y1), score, cls in zip(boxes, np.asarray(scores).reshape(-1), np.asarray(classes).reshape(-1)):
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
        if transform is not None:
            corners = [transform @ c for c in corners]
        cls = int(cls)
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[float(x), float(y)] for x, y in corners]]},
            "properties": {
                "category_id": cls + 1,
                "category": class_names[cls] if 0 <= cls < len(class_names) else str(cls),
                "score": float(score),
                "bbox_pixels": [float(x0), float(y0), float(x1), float(y1)],
            },
        })
    collection = {"type": "FeatureCollection", "features": features,
                  "properties": {"image": image_file,
                                 "coordinates": "map" if transform is not None else "pixel"}}
    if transform is not None and crs is not None:
        collection["crs"] = _crs_member(crs)
    elif transform is None:
        collection["properties"]["note"] = "pixel coordinates of the image (x right, y down), not georeferenced"
    return collection
