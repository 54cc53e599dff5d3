"""Fixtures shared by several test files."""
import cv2
import numpy as np
import pytest
import sdconet
import torch
from sdconet import register_sdconet_datasets
from sdconet.data.datasets import datasets_root
from sdconet.data.synthetic import generate_split
from torch.overrides import TorchFunctionMode


@pytest.fixture
def synthetic_root(tmp_path):
    """A small synthetic dataset (8 train, 4 test tiles) registered under the built-in names."""
    root = str(tmp_path / "datasets")
    generate_split(root, "train", 8, seed=0)
    generate_split(root, "test", 4, seed=0)
    sdconet.register_sdconet_datasets(root)
    yield root
    sdconet.register_sdconet_datasets(datasets_root())


class HostReads(TorchFunctionMode):
    """Counts the calls that bring tensor values to the host (each a device sync on CUDA)."""

    READS = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads():
    """A fresh :class:`HostReads`: enter it around the code under test, then read ``count``."""
    return HostReads()


@pytest.fixture
def restore_default_registration():
    """Register the datasets under the default root again after a test that moved them."""
    yield
    register_sdconet_datasets(datasets_root())


@pytest.fixture
def image_dir(tmp_path):
    """A random 20x30 BGR image written as PNG, gray, RGBA, 16-bit TIFF, plus corrupt / empty / truncated files."""
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    paths = {}
    paths["png8"] = str(tmp_path / "rgb.png")
    cv2.imwrite(paths["png8"], bgr)
    paths["gray"] = str(tmp_path / "gray.png")
    cv2.imwrite(paths["gray"], bgr[:, :, 0])
    paths["rgba"] = str(tmp_path / "rgba.png")
    cv2.imwrite(paths["rgba"], np.dstack([bgr, np.full((20, 30), 7, np.uint8)]))
    paths["tif16"] = str(tmp_path / "img16.tif")
    cv2.imwrite(paths["tif16"], bgr.astype(np.uint16) * 16)  # 12-bit data in a 16-bit file
    paths["corrupt"] = str(tmp_path / "corrupt.png")
    with open(paths["corrupt"], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nthis is not really a png")
    paths["empty"] = str(tmp_path / "empty.jpg")
    open(paths["empty"], "wb").close()
    paths["truncated"] = str(tmp_path / "truncated.png")
    with open(paths["png8"], "rb") as f:
        data = f.read()
    with open(paths["truncated"], "wb") as f:
        f.write(data[: len(data) // 3])
    return bgr, paths
