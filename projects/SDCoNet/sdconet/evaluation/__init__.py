"""Evaluators: COCO AP with tiny-object bands, and SR quality (PSNR/SSIM on Y)."""
from .coco_small import SmallObjectCOCOEvaluator
from .sr_quality import SRQualityEvaluator, psnr_y, ssim_y

__all__ = ["SmallObjectCOCOEvaluator", "SRQualityEvaluator", "psnr_y", "ssim_y"]
