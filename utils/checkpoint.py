"""Checkpoints: atomic writes, safe loads, clear errors.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads with
``torch.load(weights_only=True)`` — a file carrying pickled code is refused, never executed.

The frozen VxL sampler (CLIP) is *not* stored: it is rebuilt from ``--clip_weights`` (or, for the
``tiny`` preset, from its fixed seed). That keeps a ViT-B/16 checkpoint at ~1 GB instead of ~1.6 GB.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
from pathlib import Path

import torch

from utils.io import atomic_write

# The layout of what train.py saves; raised when a change would stop older code reading it right.
CHECKPOINT_FORMAT = 2
EXCLUDED_PREFIXES = ("sampler.",)  # frozen CLIP, rebuilt from its own weights


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which file and what to do."""


def strip_wrappers(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_state_dict(model: torch.nn.Module) -> dict:
    """The trainable model's state dict, without wrappers and without the frozen sampler."""
    state = strip_wrappers(model).state_dict()
    return {k: v for k, v in state.items() if not k.startswith(EXCLUDED_PREFIXES)}


def rng_state() -> dict:
    """This process's random state: CPU, Python, and the current CUDA device's (the one it trains on)."""
    state = {"torch": torch.get_rng_state(), "python": list_tree(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_current"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(tuple_tree(state["python"]))
    if "cuda_current" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_current"])
    elif "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])  # checkpoints written before per-rank states


def list_tree(x):
    return [list_tree(v) for v in x] if isinstance(x, (tuple, list)) else x


def tuple_tree(x):
    return tuple(tuple_tree(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, and only then
    renamed over ``path``: a reader (or a crash, SIGKILL, a full disk) sees the old checkpoint or the
    new one, never half of one. On failure the temporary file is removed and the old file is intact.
    """
    path = Path(path)
    try:
        with atomic_write(path, "wb") as f:
            torch.save(state, f)
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise CheckpointError(
            f"could not write checkpoint {path}: {why}. The previous checkpoint, if any, is "
            f"unchanged; free some space (or choose another --output_dir) and resume with --resume."
        ) from e
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (safe loading only)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder: pass the .pth file inside it (e.g. "
                              f"{path / 'best.pth'}), or give the experiment with --exp.")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check --exp / --checkpoint.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was never written completely.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            raise CheckpointError(
                f"refusing to load {path}: it carries pickled Python objects or code, which a PuXIM "
                f"checkpoint never does. Only load checkpoints you trust, written by this repository."
            ) from e
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({msg.splitlines()[0]}).") from e
    except Exception as e:  # truncated files fail in many ways (EOFError, KeyError, RuntimeError...)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or not a checkpoint: {first})."
        ) from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a PuXIM checkpoint (no 'model' entry): use a checkpoint.pth or "
                              f"best.pth written by this repository's train.py.")
    version = state.get("format", CHECKPOINT_FORMAT)
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {version!r}, newer than this code reads "
                              f"({CHECKPOINT_FORMAT}): update this repository (git pull) to load it.")
    return state


def load_model_weights(model: torch.nn.Module, state_dict: dict, *, source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model`` (sampler excluded), refusing any architecture mismatch.

    Every missing, unexpected or wrongly shaped key is named in the error, with the hint that the
    checkpoint was most likely made with another ``--arch`` / ``--separate_encoders`` setting.
    """
    own = model_state_dict(model)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match this model's architecture:"]
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatches, e.g. " + "; ".join(shapes[:3]))
        if missing:
            lines.append(f"  {len(missing)} keys missing from the checkpoint, e.g. {missing[:3]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        lines.append("  It was probably made with another --arch (or --separate_encoders) setting.")
        raise CheckpointError("\n".join(lines))
    strip_wrappers(model).load_state_dict(state_dict, strict=False)  # only sampler keys are absent
