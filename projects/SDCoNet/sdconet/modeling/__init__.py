"""Model parts of SDCoNet; importing this registers the backbone and the meta-architectures."""
from . import backbone as _backbone  # noqa: F401  (registers build_timm_swin_backbone)
from .meta_arch import SDCoNet
from .serial import SerialSRDetector

__all__ = ["SDCoNet", "SerialSRDetector"]
