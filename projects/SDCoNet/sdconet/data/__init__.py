"""Datasets: registration, metadata, json checks, image reading, the mapper, converters, the synthetic set."""
from .datasets import register_sdconet_dataset, register_sdconet_datasets

__all__ = ["register_sdconet_dataset", "register_sdconet_datasets"]
