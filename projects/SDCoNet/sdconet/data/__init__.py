"""Datasets: registration, metadata, json checks, image reading, the mapper, converters, the synthetic set."""
