"""Precomputed VxL keep-masks: compute once with ``python -m tools.precompute_masks``, train without CLIP.

Photo preprocessing has no randomness, so a photo's keep-mask is a fixed function of the photo, its
class name, the CLIP weights and the sampler settings. The file that stores them is a data-side format,
``datasets.mask_cache.MaskCache`` (re-exported here); this module computes its ``key``, the settings that
determine a mask (:func:`cache_key`), from a built sampler (:func:`mask_cache_key`) or from the command line
(:func:`expected_cache_key`).

The key can be computed from the command line alone (:func:`expected_cache_key`), without
building CLIP, so ``train.py --vxl_cache FILE`` skips CLIP entirely and still refuses a cache made
with other settings. The CLIP is identified by

* a weights file: the sha256 of the file's bytes (0.4 s for OpenAI's 335 MB ViT-B-16.pt at about
  1 GB/s). Hashing the file rather than the loaded tensors needs no CLIP in memory; the price is
  that the same weights saved in another format (state dict vs. TorchScript) count as a different
  CLIP and are refused: a false refusal, never a false acceptance;
* ``--clip_weights openai``: open_clip's pretrained tag (open_clip pins that download's hash);
* the ``tiny`` preset's seeded random CLIP: the sha256 of its tensors. It is rebuilt to hash them
  (a 4M-parameter model, a fraction of a second), which catches a torch or open_clip release that
  initialises it differently; a seed alone would not.

What the key does not cover: the image files themselves (a photo replaced under the same path keeps
its stale mask) and float round-off between devices (masks computed on a GPU may differ from CPU
ones in a near-tie patch; both are valid masks).
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional, Sequence

import torch

from datasets.mask_cache import (CACHE_FORMAT, MaskCache, MaskCacheError, MaskCacheMissError, RootedMaskLookup,
                                 compare_keys, pack_masks, unpack_masks)
from utils.config import RunConfig
from utils.presets import get_architecture

from .weight_errors import WeightFileNotFoundError, WeightMismatchError

_logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT", "PREPROCESSING", "MaskCache", "MaskCacheError", "MaskCacheMissError", "RootedMaskLookup",
    "cache_key", "clip_identity", "compare_keys", "expected_cache_key", "file_sha256",
    "load_mask_cache_for_training", "mask_cache_key", "pack_masks", "tensor_sha256", "unpack_masks",
]

# How a photo reaches CLIP (datasets.transforms.preprocess_photo); bump when that changes.
PREPROCESSING = "photo-v1: RGB, resize to image_size x image_size (PIL bilinear), (x - 0.5) / 0.5"


# --------------------------------------------------------------------------- fingerprints
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict: names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes (0-d: reshaped first)
    return h.hexdigest()


def clip_identity(arch: str, clip_weights: Optional[str]) -> dict:
    """Identity of the CLIP that ``build_vxl_sampler(arch, clip_weights)`` would load (see module doc)."""
    from .vxl_sampler import RANDOM_CLIP_SEED, build_random_clip, open_clip_config_beside

    sampler = get_architecture(arch).sampler
    model = sampler.clip_model if sampler.random_clip is None else arch  # a random CLIP: named by its preset
    if clip_weights is None:
        if sampler.random_clip is None:
            raise WeightMismatchError(f"the {arch} preset needs --clip_weights (OpenAI's ViT-B-16.pt or 'openai')")
        return {"model": model, "source": "random", "seed": RANDOM_CLIP_SEED,
                "weights_sha256": tensor_sha256(build_random_clip(sampler.random_clip))}
    if os.fspath(clip_weights) == "openai":
        return {"model": model, "source": "open_clip", "pretrained": "openai"}
    if not os.path.isfile(clip_weights):
        raise WeightFileNotFoundError(f"CLIP checkpoint not found: {clip_weights}")
    identity = {"model": model, "source": "file", "sha256": file_sha256(clip_weights)}
    # The activation of a file that does not carry OpenAI's entries comes from the open_clip config beside it
    # (models.vxl_sampler.clip_file_activation), so that file is part of what the masks depend on.
    config_path = open_clip_config_beside(clip_weights)
    if os.path.isfile(config_path):
        identity["open_clip_config_sha256"] = file_sha256(config_path)
    return identity


# --------------------------------------------------------------------------- keys
def cache_key(*, clip: dict, keep_ratio: float, prompt: str, feature_norm: str, input_norm: str,
              surgery_depth: int, image_size: int, grid_size: Sequence[int]) -> dict:
    """The settings that determine a keep-mask, as a JSON-able dict (compared field by field)."""
    return {
        "clip": dict(clip), "keep_ratio": float(keep_ratio), "prompt": str(prompt),
        "feature_norm": str(feature_norm), "input_norm": str(input_norm), "surgery_depth": int(surgery_depth),
        "image_size": int(image_size), "grid_size": [int(g) for g in grid_size], "preprocessing": PREPROCESSING,
    }


def mask_cache_key(sampler, *, image_size: int, clip: dict) -> dict:
    """The key of the masks a built :class:`~models.vxl_sampler.VxLSampler` makes on ``image_size`` photos.

    ``clip`` is :func:`clip_identity` of the weights the sampler was built from (a sampler does not
    know its source file).
    """
    return cache_key(clip=clip, keep_ratio=sampler.keep_ratio, prompt=sampler.prompt,
                     feature_norm=sampler.feature_norm, input_norm=sampler.input_norm,
                     surgery_depth=sampler.surgery_depth, image_size=image_size,
                     grid_size=tuple(sampler.clip.visual.grid_size))


def _preset_clip_geometry(arch: str) -> tuple[int, int, int]:
    """``(image_size, patch_size, surgery_depth)`` of the CLIP ``build_vxl_sampler(arch)`` builds."""
    sampler = get_architecture(arch).sampler  # build_vxl_sampler passes its surgery_depth
    if sampler.random_clip is not None:
        vision = sampler.random_clip["vision_cfg"]
    else:
        import open_clip

        vision = open_clip.get_model_config(sampler.clip_model)["vision_cfg"]
    return int(vision["image_size"]), int(vision["patch_size"]), int(sampler.surgery_depth)


def expected_cache_key(config: RunConfig) -> dict:
    """The key a cache must have for a run of ``config``, without building CLIP (except a random one, to hash it).

    ``tools.precompute_masks`` writes this very key and checks it against the sampler it builds,
    so a change in ``build_vxl_sampler`` cannot silently desynchronise the two.
    """
    from .vxl_sampler import sampler_keywords

    arch, image_size = config.model.arch, config.data.image_size
    _, patch, depth = _preset_clip_geometry(arch)
    return cache_key(clip=clip_identity(arch, config.model.clip_weights),
                     **sampler_keywords(config.model.sampler_settings()),
                     surgery_depth=depth, image_size=image_size, grid_size=(image_size // patch, image_size // patch))


def load_mask_cache_for_training(path: str | os.PathLike, config: RunConfig) -> MaskCache:
    """Load the cache at ``path`` and check it against the run's settings (:func:`expected_cache_key`).

    No CLIP is built (except the tiny preset's random one, to hash it). Coverage of the training
    photos is checked by ``datasets.build_datasets(config, mask_cache=...)``.
    """
    cache = MaskCache.load(path, expected_key=expected_cache_key(config))
    _logger.info("VxL masks from %s (%d photos): CLIP is not run during training.", path, len(cache))
    return cache
