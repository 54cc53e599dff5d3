"""Inference tools: single images, tiled large scenes, GeoJSON output and ONNX export."""
from .predictor import Predictor
from .tiling import Tile, merge_tile_detections, tile_grid

__all__ = ["Predictor", "Tile", "merge_tile_detections", "tile_grid"]
