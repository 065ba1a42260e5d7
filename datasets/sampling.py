"""Training triplets and evaluation image sets.

Training follows the released recipe: an "epoch" is ``length`` sampled triplets, not a pass
over the data. Triplet ``k`` is drawn from its own generator ``np.random.default_rng([seed, k])``,
so it is the same whatever the worker count, process or rank that draws it, and a global
id ``epoch * length + i`` (see :class:`TripletIndexSampler`) gives every epoch and rank its
own triplets. Per triplet:

* class c uniformly over the classes that have both sketches and photos;
* the sketch and the positive photo uniformly within c;
* the negative class uniformly over the *other* classes that have photos, and the
  negative photo uniformly within it.

Every file can be drawn (the released sampler never picks a class's first file).

Training aids that are not the paper's (the ``tiny`` preset's) are *extras* a :class:`TripletDataset` is
built with, each adding to or changing the item: :class:`PseudoSketches` and :class:`RandomCropFlips`.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .filelist import DatasetError
from .transforms import load_image, preprocess_photo, preprocess_pseudo_sketch, preprocess_sketch, random_crop_flip

__all__ = ["TripletDataset", "TripletIndexSampler", "ImageListDataset", "subsample_per_class", "PseudoSketches",
           "RandomCropFlips"]

IMAGE_KEYS = ("sketch", "positive", "negative")  # the images of a triplet (item keys, and "<key>_path")


class PseudoSketches:
    """Extra: ``item["pseudo_sketch"]``, the positive photo's outlines drawn as a sketch
    (``transforms.preprocess_pseudo_sketch``), for the instance loss (``losses.InstanceLoss``)."""

    crops_photos = False

    def __init__(self, image_size: int):
        self.image_size = int(image_size)

    def __call__(self, item: dict, images: dict) -> None:
        item["pseudo_sketch"] = preprocess_pseudo_sketch(images["positive"], self.image_size)  # [3, S, S]


class RandomCropFlips:
    """Extra: each image of the item (sketch, positive, pseudo-sketch, negative, in that order) gets its own
    random crop and flip (``transforms.random_crop_flip``), drawn from ``np.random.default_rng([seed, k, 1])``
    for triplet ``k``: the same on every call and in any worker, and the triplet's files stay the same."""

    crops_photos = True
    KEYS = ("sketch", "positive", "pseudo_sketch", "negative")

    def __init__(self, seed: int):
        self.seed = int(seed)

    def __call__(self, item: dict, images: dict) -> None:
        rng = np.random.default_rng([self.seed, item["index"], 1])
        for key in self.KEYS:
            if key in item:
                item[key] = random_crop_flip(item[key], rng)  # [3, S, S]


class TripletDataset(Dataset):
    """Class-balanced (sketch, positive photo, negative photo) triplets, indexed by any k >= 0.

    Args:
        sketches, photos: class name → files (e.g. ``BenchmarkSplit.train_sketches``).
        length: triplets per epoch (``__len__``); ``__getitem__`` accepts any k >= 0.
        image_size: side of the preprocessed images.
        seed: base seed; triplet k uses ``np.random.default_rng([seed, k])``.
        mask_lookup: optional ``photo path -> keep-mask [N]`` (e.g. ``MaskCache.lookup(root)`` of
            ``models.vxl_cache``); items then carry ``positive_mask`` / ``negative_mask`` (float
            ``[N]``) and the model needs no CLIP.
        extras: callables ``extra(item, images)`` applied in order to each preprocessed item, given the
            triplet's decoded images (``images["sketch" | "positive" | "negative"]``, PIL); each adds to or
            changes ``item`` in place, e.g. ``[PseudoSketches(size), RandomCropFlips(seed)]``. One whose
            ``crops_photos`` is true cannot go with ``mask_lookup``: the cached masks are of whole photos.
    """

    def __init__(self, *, sketches: dict[str, list[Path]], photos: dict[str, list[Path]],
                 length: int, image_size: int, seed: int,
                 mask_lookup: Optional[Callable[[str], torch.Tensor]] = None,
                 extras: Sequence[Callable[[dict, dict], None]] = ()):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.length = int(length)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.mask_lookup = mask_lookup
        self.extras = list(extras)
        cropping = [type(e).__name__ for e in self.extras if getattr(e, "crops_photos", False)]
        if cropping and mask_lookup is not None:
            raise ValueError(f"{cropping[0]} crops the photos, mask_lookup holds masks of whole photos: "
                             f"use one of them")
        # Sorted class order and str paths: the draw depends only on the data, not on dict order.
        self.photos = {c: [os.fspath(p) for p in v] for c, v in sorted(photos.items()) if v}
        self.sketches = {c: [os.fspath(p) for p in v] for c, v in sorted(sketches.items()) if v}
        self.classes = [c for c in self.sketches if c in self.photos]  # anchor classes
        self.negative_pool = list(self.photos)  # classes with photos
        self._pool_index = {c: i for i, c in enumerate(self.negative_pool)}
        if not self.classes:
            raise DatasetError("no training class has both sketches and photos; check the train lists.")
        if len(self.negative_pool) < 2:
            raise DatasetError("triplets need photos of at least two training classes for negatives.")

    def __len__(self) -> int:
        return self.length

    def describe(self, k: int) -> dict:
        """The classes and files of triplet ``k``, without loading any image."""
        if k < 0:
            raise IndexError(f"triplet index must be >= 0, got {k}")
        rng = np.random.default_rng([self.seed, int(k)])
        cls = self.classes[rng.integers(len(self.classes))]
        sketch_files, photo_files = self.sketches[cls], self.photos[cls]
        sketch = sketch_files[rng.integers(len(sketch_files))]
        positive = photo_files[rng.integers(len(photo_files))]
        # Uniform over the pool without c: draw among n-1 slots and skip c's slot.
        j = int(rng.integers(len(self.negative_pool) - 1))
        if j >= self._pool_index[cls]:
            j += 1
        neg_cls = self.negative_pool[j]
        neg_files = self.photos[neg_cls]
        negative = neg_files[rng.integers(len(neg_files))]
        # Labels index ``label_names`` (the seen classes with photos): the tiny preset's seen-class loss.
        return {"positive_class": cls, "negative_class": neg_cls, "positive_label": self._pool_index[cls],
                "negative_label": j, "sketch_path": sketch, "positive_path": positive, "negative_path": negative,
                "index": int(k)}

    @property
    def label_names(self) -> list[str]:
        """Class of each training label (``positive_label`` / ``negative_label``), sorted by name."""
        return list(self.negative_pool)

    def __getitem__(self, k: int) -> dict:
        """Triplet ``k`` as tensors ``[3, S, S]``; an unreadable file raises ImageLoadError."""
        item = self.describe(k)
        size = self.image_size
        images = {key: load_image(item[f"{key}_path"]) for key in IMAGE_KEYS}  # PIL, RGB
        item["sketch"] = preprocess_sketch(images["sketch"], size)  # [3, S, S]
        item["positive"] = preprocess_photo(images["positive"], size)  # [3, S, S]
        item["negative"] = preprocess_photo(images["negative"], size)  # [3, S, S]
        for extra in self.extras:
            extra(item, images)
        if self.mask_lookup is not None:
            item["positive_mask"] = self.mask_lookup(item["positive_path"]).float()  # [N]
            item["negative_mask"] = self.mask_lookup(item["negative_path"]).float()  # [N]
        return item


class TripletIndexSampler(Sampler[int]):
    """Global triplet ids for one rank: ``epoch * length + i``.

    Rank r of W takes ``i = r, r + W, r + 2W, ...`` below ``(length // W) * W``; when
    ``length`` is not divisible by ``world_size`` the last ``length % W`` ids of each epoch
    are dropped, so every rank runs the same number of steps. ``shuffle_seed`` (None: in order)
    permutes the order in which a rank visits its ids (seeded by it and the epoch); the triplets
    themselves are already random. ``set_epoch(epoch, skip=n)`` resumes mid-epoch by skipping
    this rank's first n ids.
    """

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1, shuffle_seed: Optional[int] = None):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if length < world_size:
            raise ValueError(f"length {length} is smaller than world_size {world_size}")
        self.length, self.rank, self.world_size = int(length), int(rank), int(world_size)
        self.shuffle_seed = shuffle_seed
        self.num_per_rank = self.length // self.world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if epoch < 0 or not 0 <= skip <= self.num_per_rank:
            raise ValueError(f"need epoch >= 0 and 0 <= skip <= {self.num_per_rank}")
        self.epoch, self.skip = int(epoch), int(skip)

    def local_ids(self) -> list[int]:
        """This rank's global ids for the current epoch, in visiting order (before ``skip``)."""
        offsets = np.arange(self.rank, self.num_per_rank * self.world_size, self.world_size)
        if self.shuffle_seed is not None:
            offsets = np.random.default_rng([self.shuffle_seed, self.epoch]).permutation(offsets)
        return [self.epoch * self.length + int(i) for i in offsets]

    def __iter__(self):
        return iter(self.local_ids()[self.skip:])

    def __len__(self) -> int:
        return self.num_per_rank - self.skip


class ImageListDataset(Dataset):
    """Evaluation images: ``items`` of (path, class) → dict(image, label, index, path)."""

    def __init__(self, *, items: list[tuple[Path, str]], class_to_idx: dict[str, int],
                 kind: str, image_size: int):
        if kind not in ("sketch", "photo"):
            raise ValueError(f"kind must be 'sketch' or 'photo', got {kind!r}")
        unknown = sorted({c for _, c in items} - set(class_to_idx))
        if unknown:
            raise DatasetError(f"{kind} items have classes missing from class_to_idx: {unknown[:10]}")
        self.items = [(os.fspath(p), c) for p, c in items]
        self.class_to_idx = dict(class_to_idx)
        self.kind = kind
        self.image_size = int(image_size)
        self._preprocess = preprocess_sketch if kind == "sketch" else preprocess_photo

    @property
    def labels(self) -> torch.Tensor:
        """All labels in item order, ``[N]`` int64 (no image loading)."""
        return torch.tensor([self.class_to_idx[c] for _, c in self.items], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, cname = self.items[index]
        image = self._preprocess(load_image(path), self.image_size)  # [3, S, S]
        return {"image": image, "label": self.class_to_idx[cname], "index": int(index), "path": path}


def subsample_per_class(items: list[tuple[Path, str]], max_per_class: int | None, *,
                        seed: int) -> list[tuple[Path, str]]:
    """Keep at most ``max_per_class`` items of each class, chosen at random but reproducibly.

    The choice for a class depends only on ``seed`` and that class's items; the kept items
    stay in their original order.
    """
    if max_per_class is None:
        return list(items)
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    positions: dict[str, list[int]] = defaultdict(list)
    for i, (_, cname) in enumerate(items):
        positions[cname].append(i)
    keep: set[int] = set()
    for cname in sorted(positions):
        idx = positions[cname]
        if len(idx) <= max_per_class:
            keep.update(idx)
        else:
            # A per-class generator keyed by the class name's bytes (stable across runs).
            rng = np.random.default_rng([seed, *cname.encode("utf-8")])
            keep.update(idx[j] for j in rng.choice(len(idx), max_per_class, replace=False))
    return [item for i, item in enumerate(items) if i in keep]
