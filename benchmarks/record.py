"""Benchmark scripts record through `psm_jax.records` (the one implementation); this module re-exports it."""
from psm_jax.records import command_line, machine, record, results_path  # noqa: F401
