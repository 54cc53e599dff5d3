#!/usr/bin/env python
"""Installs the ``sdconet`` package (projects/SDCoNet/sdconet), a detectron2 project extension.

torch and detectron2 are not installed from here: torch must match the machine (CUDA or CPU build)
and detectron2 needs its own patched install. ``make setup`` does all three in order.
"""
import sys

from setuptools import find_packages, setup

if sys.version_info < (3, 10):
    sys.exit("sdconet needs Python >= 3.10")


def _require(module, hint):
    try:
        __import__(module)
    except ImportError:
        sys.exit(f"sdconet: '{module}' is not importable while building. {hint} If it is installed, "
                 "install sdconet with `pip install --no-build-isolation -e .` so the build can see it.")


# Fail early with a clear message (the DensePose pattern) rather than deep inside an import.
# `pip install -e .` runs this file in a subprocess; with build isolation it would not see torch,
# so install with --no-build-isolation (make setup does); the message below says so too.
if not any(arg in sys.argv for arg in ("egg_info", "sdist", "--name", "--version", "dist_info")):
    _require("torch", "Install it first: pip install torch==2.14.1 torchvision==0.29.1 (or run `make setup`).")
    _require("detectron2", "Install it first: python tools/install_detectron2.py (or run `make setup`).")

setup(
    name="sdconet",
    version="0.1.0",
    description="SDCoNet (saliency-driven SR + DINO detection for small objects in low-quality "
    "remote-sensing images) as a detectron2 project",
    python_requires=">=3.10",
    package_dir={"": "projects/SDCoNet"},
    packages=find_packages("projects/SDCoNet", include=["sdconet", "sdconet.*"]),
    install_requires=[
        "timm>=1.0.9",
        "fvcore>=0.1.5",
        "pycocotools>=2.0.7",
        "faster-coco-eval>=1.6",  # faster COCO evaluation; SmallObjectCOCOEvaluator falls back to pycocotools
        "opencv-python-headless>=4.8",
        "scipy>=1.10",
        "numpy>=1.24",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "tabulate",
        "rasterio>=1.3",
        "onnx>=1.15",
        "onnxruntime>=1.17",
        "onnxscript",
    ],
    extras_require={
        "test": ["pytest>=7", "scikit-image>=0.22"],  # skimage: reference PSNR/SSIM in tests
        # Peers for tools/compare.py --peer and tools/train_peer.py only; sdconet never imports them.
        "benchmark": ["ultralytics>=8.3", "transformers>=4.40", "sahi>=0.11"],
    },
)
