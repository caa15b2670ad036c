"""Embedded tasks: deterministic datasets with their own metrics."""
