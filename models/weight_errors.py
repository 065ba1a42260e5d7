"""Errors of reading pretrained weights: the user's (a message and exit status 2 in train.py and the tools)."""
from __future__ import annotations

__all__ = ["WeightLoadError", "WeightFileNotFoundError", "WeightMismatchError"]


class WeightLoadError(RuntimeError):
    """A pretrained-weight source could not be read (missing file, offline hub, bad format)."""


class WeightFileNotFoundError(WeightLoadError, FileNotFoundError):
    """A weight file named on the command line does not exist."""


class WeightMismatchError(WeightLoadError, ValueError):
    """Weights that do not fit the model (other architecture, other key names, missing piece)."""
