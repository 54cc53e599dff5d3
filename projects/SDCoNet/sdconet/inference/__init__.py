"""Inference tools: single images, tiled large scenes, GeoJSON output and ONNX export."""
from .predictor import Predictor, load_config
from .tiling import Tile, merge_tile_detections, tile_grid

__all__ = ["Predictor", "load_config", "Tile", "merge_tile_detections", "tile_grid"]
