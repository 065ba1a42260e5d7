"""Utilities: metrics, checkpoints, logging, distributed helpers."""
