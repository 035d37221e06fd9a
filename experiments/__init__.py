"""Experiment modules and the data they use (see experiments/datasets.py)."""
