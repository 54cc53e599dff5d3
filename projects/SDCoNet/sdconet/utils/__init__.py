"""Helpers for the tools: parameter and FLOP counts, timings, the run's description, and statistics over seeds."""
