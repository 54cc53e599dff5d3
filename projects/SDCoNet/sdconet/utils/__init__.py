"""Measuring helpers for the tools: parameter and FLOP counts, timings, and the run's description."""
