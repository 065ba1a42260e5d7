"""The VxL mask-cache file: precomputed keep-masks of a benchmark's photos, keyed by relative path.

A data-side file format: ``datasets.build_datasets(config, mask_cache=...)`` reads it and hands each training
triplet its photos' masks, so training runs no CLIP. What the masks depend on (the CLIP, the sampler
settings) is the cache's ``key``, computed by ``models.vxl_cache`` (``cache_key``, ``expected_cache_key``);
this module stores, reads, compares and looks up, and knows nothing about CLIP.

:class:`MaskCache` stores the masks bit-packed (``numpy.packbits``: 196 bits -> 25 bytes per photo), keyed
by the photo's path relative to the dataset folder (``BenchmarkSplit.root``, e.g. ``ROOT/Sketchy``), in one
``.npz`` file:

============  ==========================================================================
``key``        JSON of the settings that determine a mask (``models.vxl_cache.cache_key``)
``meta``       JSON of facts that do not (versions, device, the command that made it, ...)
``paths``      ``[P]`` str, photo paths relative to the dataset folder, ``/``-separated
``bits``       ``[P, ceil(N / 8)]`` uint8, row i = ``packbits(mask of paths[i])``
``num_patches`` N
``format``     file-format version (:data:`CACHE_FORMAT`)
============  ==========================================================================
"""
from __future__ import annotations

import json
import os
from pathlib import PurePosixPath
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from utils.io import atomic_write

__all__ = ["CACHE_FORMAT", "MaskCache", "MaskCacheError", "MaskCacheMissError", "RootedMaskLookup", "compare_keys",
           "pack_masks", "unpack_masks"]

CACHE_FORMAT = 1
_REQUIRED_FIELDS = ("format", "key", "meta", "paths", "bits", "num_patches")


class MaskCacheError(RuntimeError):
    """A mask cache is missing, unreadable, stale (other settings) or incomplete; the message says why."""


class MaskCacheMissError(MaskCacheError, KeyError):
    """A photo is not in the cache (a ``KeyError`` too, so ``cache.get`` behaves like a mapping)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- bit packing
def pack_masks(masks) -> np.ndarray:
    """0/1 masks ``[P, N]`` (tensor or array) -> packed bits ``[P, ceil(N / 8)]`` uint8."""
    arr = masks.detach().cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
    if arr.ndim != 2:
        raise ValueError(f"masks must be [P, N], got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError("masks must hold only 0 and 1")
    return np.packbits(arr.astype(bool), axis=1)


def unpack_masks(bits: np.ndarray, num_patches: int) -> torch.Tensor:
    """Packed bits ``[P, ceil(N / 8)]`` -> float masks ``[P, N]``."""
    return torch.from_numpy(np.unpackbits(bits, axis=1, count=num_patches).astype(np.float32))


def _describe_clip(clip: dict) -> str:
    if clip.get("source") == "file":
        return f"{clip.get('model')} from a file with sha256 {str(clip.get('sha256'))[:12]}…"
    if clip.get("source") == "random":
        return (f"random {clip.get('model')} CLIP, seed {clip.get('seed')}, "
                f"weights {str(clip.get('weights_sha256'))[:12]}…")
    return ", ".join(f"{k}={v}" for k, v in clip.items())


def compare_keys(cached: dict, expected: dict) -> List[str]:
    """Human-readable differences between a cache's key and the one expected now (empty: same)."""
    diffs = []
    for name in sorted(set(cached) | set(expected)):
        a, b = cached.get(name, "<missing>"), expected.get(name, "<missing>")
        if a == b:
            continue
        if name == "clip" and isinstance(a, dict) and isinstance(b, dict):
            diffs.append(f"made with a different CLIP (cache: {_describe_clip(a)}; now: {_describe_clip(b)})")
        else:
            diffs.append(f"{name} {json.dumps(a, ensure_ascii=False)} in cache vs "
                         f"{json.dumps(b, ensure_ascii=False)} now")
    return diffs


def _normalise_path(path: str | os.PathLike) -> str:
    """A relative photo path in the cache's form: ``/``-separated, no ``./``."""
    text = os.fspath(path).replace("\\", "/")
    if PurePosixPath(text).is_absolute():
        raise ValueError(f"mask cache paths are relative to the dataset folder, got an absolute path {text!r}")
    return str(PurePosixPath(text))


# --------------------------------------------------------------------------- the cache
class MaskCache:
    """Bit-packed keep-masks of many photos, one ``.npz`` file (see module doc).

    Args:
        key: the settings the masks were made with (``models.vxl_cache.cache_key``).
        num_patches: N, the mask length.
        meta: informational facts saved with the cache (not compared).
        source: the file it was loaded from (for messages).
    """

    def __init__(self, *, key: dict, num_patches: int, meta: Optional[dict] = None, source: Optional[str] = None):
        if num_patches < 1:
            raise ValueError(f"num_patches must be >= 1, got {num_patches}")
        self.key = dict(key)
        self.num_patches = int(num_patches)
        self.meta = dict(meta or {})
        self.source = source
        self._paths: List[str] = []
        self._index: Dict[str, int] = {}
        self._bits = np.zeros((0, self.row_bytes), np.uint8)  # capacity >= len(self)

    @property
    def row_bytes(self) -> int:
        return (self.num_patches + 7) // 8

    @property
    def paths(self) -> List[str]:
        return list(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, path) -> bool:
        try:
            return _normalise_path(path) in self._index
        except (TypeError, ValueError):
            return False

    def __repr__(self) -> str:
        return f"MaskCache({len(self)} photos, N={self.num_patches}, source={self.source!r})"

    # ------------------------------------------------------------------ writing
    def add(self, paths: Sequence[str], masks) -> None:
        """Store the 0/1 masks ``[P, N]`` of ``paths`` (relative); a path already present is overwritten."""
        paths = [_normalise_path(p) for p in paths]
        bits = pack_masks(masks)  # [P, row_bytes]
        if bits.shape[0] != len(paths) or (len(paths) and masks.shape[1] != self.num_patches):
            raise ValueError(f"got {len(paths)} paths but masks of shape {tuple(masks.shape)}; "
                             f"expected [{len(paths)}, {self.num_patches}]")
        for path, row in zip(paths, bits):
            i = self._index.get(path)
            if i is None:
                i = len(self._paths)
                if i == self._bits.shape[0]:  # grow by doubling: O(1) amortised per photo
                    grown = np.zeros((max(64, 2 * i), self.row_bytes), np.uint8)
                    grown[:i] = self._bits[:i]
                    self._bits = grown
                self._paths.append(path)
                self._index[path] = i
            self._bits[i] = row

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache atomically: a temporary file in the same folder, then ``os.replace``."""
        with atomic_write(path, "wb") as f:
            np.savez_compressed(
                f, format=np.int64(CACHE_FORMAT), key=np.array(json.dumps(self.key, sort_keys=True)),
                meta=np.array(json.dumps(self.meta, sort_keys=True)), num_patches=np.int64(self.num_patches),
                paths=np.array(self._paths, dtype=str), bits=self._bits[:len(self)])
        self.source = os.fspath(path)

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str | os.PathLike, expected_key: Optional[dict] = None) -> "MaskCache":
        """Read a cache file; with ``expected_key``, refuse (``MaskCacheError``) one made with other settings."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MaskCacheError(f"mask cache not found: {path} (make it with python -m tools.precompute_masks "
                                 f"... --out {path})")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in _REQUIRED_FIELDS if k not in data.files]
                if missing:
                    raise MaskCacheError(f"{path}: not a mask cache (fields {missing} missing)")
                fmt = int(data["format"])
                if fmt != CACHE_FORMAT:
                    raise MaskCacheError(f"{path}: mask cache format {fmt}, this code reads format {CACHE_FORMAT}; "
                                         f"recompute it with python -m tools.precompute_masks")
                key, meta = json.loads(str(data["key"])), json.loads(str(data["meta"]))
                num_patches, paths, bits = int(data["num_patches"]), [str(p) for p in data["paths"]], data["bits"]
        except MaskCacheError:
            raise
        except Exception as e:  # zip/npz/JSON errors: name the file, not numpy's internals
            raise MaskCacheError(f"{path}: unreadable mask cache ({type(e).__name__}: {e}); delete it and "
                                 f"recompute with python -m tools.precompute_masks") from e
        cache = cls(key=key, num_patches=num_patches, meta=meta, source=path)
        if bits.dtype != np.uint8 or bits.shape != (len(paths), cache.row_bytes):
            raise MaskCacheError(f"{path}: corrupt mask cache (bits {bits.dtype} {bits.shape} for "
                                 f"{len(paths)} paths of {num_patches} patches)")
        if len(set(paths)) != len(paths):
            raise MaskCacheError(f"{path}: corrupt mask cache (duplicate paths)")
        cache._paths, cache._bits = paths, np.array(bits)
        cache._index = {p: i for i, p in enumerate(paths)}
        if expected_key is not None:
            diffs = compare_keys(key, expected_key)
            if diffs:
                raise MaskCacheError(
                    f"{path}: the mask cache was made with other settings than this run: " + "; ".join(diffs)
                    + ". Recompute it with python -m tools.precompute_masks and this run's settings "
                      "(or pass the cache made for them).")
        return cache

    def _miss(self, path) -> MaskCacheMissError:
        return MaskCacheMissError(
            f"photo {os.fspath(path)!r} is not in the mask cache {self.source or '(unsaved)'} ({len(self)} photos): "
            f"recompute with python -m tools.precompute_masks {self.meta.get('command', '--data_path ... --out ...')}"
            " (it adds only the missing photos)")

    def get(self, path) -> torch.Tensor:
        """The keep-mask of ``path`` (relative to the dataset folder): float ``[N]`` of 0/1."""
        i = self._index.get(_normalise_path(path))
        if i is None:
            raise self._miss(path)
        return unpack_masks(self._bits[i:i + 1], self.num_patches)[0]  # [N]

    def get_many(self, paths: Iterable) -> torch.Tensor:
        """Masks of several paths: ``[P, N]``."""
        rows = []
        for p in paths:
            i = self._index.get(_normalise_path(p))
            if i is None:
                raise self._miss(p)
            rows.append(i)
        return unpack_masks(self._bits[np.asarray(rows, dtype=np.int64)], self.num_patches)

    def missing(self, paths: Iterable) -> List[str]:
        """The (normalised) paths among ``paths`` that the cache lacks, in order."""
        return [q for q in (_normalise_path(p) for p in paths) if q not in self._index]

    # ------------------------------------------------------------------ training side
    def lookup(self, root: str | os.PathLike) -> "RootedMaskLookup":
        """A picklable ``callable(absolute_photo_path) -> [N]`` for photos under the dataset folder ``root``."""
        return RootedMaskLookup(self, root)

    def require(self, root: str | os.PathLike, photos: Iterable[str | os.PathLike]) -> None:
        """Raise ``MaskCacheError`` unless every photo (absolute paths under ``root``) is cached."""
        lookup = self.lookup(root)
        photos = list(photos)
        absent = self.missing(lookup.relative(p) for p in photos)
        if absent:
            shown = ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else "")
            raise MaskCacheError(
                f"the mask cache {self.source or '(unsaved)'} lacks {len(absent)} of the {len(photos)} training "
                f"photos ({shown}). Complete it with python -m tools.precompute_masks "
                f"{self.meta.get('command', '--data_path ... --out ...')} (it adds only the missing photos).")


class RootedMaskLookup:
    """``lookup(path) -> [N]`` for absolute photo paths under ``root`` (what ``TripletDataset`` holds)."""

    def __init__(self, cache: MaskCache, root: str | os.PathLike):
        self.cache = cache
        self.root = os.path.abspath(os.fspath(root))
        self._prefix = self.root.rstrip(os.sep) + os.sep

    def relative(self, path: str | os.PathLike) -> str:
        text = os.fspath(path)
        if text.startswith(self._prefix):  # the common case, without os.path.relpath's cost
            return text[len(self._prefix):]
        rel = os.path.relpath(os.path.abspath(text), self.root)
        if rel == ".." or rel.startswith(".." + os.sep):
            raise MaskCacheError(f"photo {text} is outside the dataset folder {self.root} the mask cache refers to")
        return rel

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        return self.cache.get(self.relative(path))  # [N]
