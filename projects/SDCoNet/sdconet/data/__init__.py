"""Datasets (registration, metadata, raw-format converters, synthetic set) and the mapper."""
