"""Fixtures shared by several test files."""
import pytest

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
