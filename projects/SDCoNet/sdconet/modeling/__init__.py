"""Model parts of SDCoNet."""
