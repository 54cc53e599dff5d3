"""Fixtures shared by several test files."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import sdconet
from sdconet.data.datasets import datasets_root
from sdconet.data.synthetic import generate_split


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
