"""Datasets for PuXIM: the ZSE-SBIR benchmark layout, preprocessing and sampling.

``build_datasets(config)`` translates the run configuration; everything below it takes explicit keyword
arguments.
"""
from __future__ import annotations

from pathlib import Path

from utils.config import DataConfig, RunConfig

from .benchmarks import DATASETS, BenchmarkSplit, load_benchmark, resolve_split, split_folders
from .filelist import DatasetError, read_class_file, read_file_list
from .sampling import (ImageListDataset, PseudoSketches, RandomCropFlips, TripletDataset, TripletIndexSampler,
                       subsample_per_class)
from .transforms import ImageLoadError, load_image, preprocess_photo, preprocess_sketch

__all__ = [
    "build_datasets", "check_data_root", "load_split", "load_benchmark", "BenchmarkSplit", "DATASETS", "DatasetError",
    "ImageLoadError", "read_class_file", "read_file_list", "TripletDataset",
    "TripletIndexSampler", "ImageListDataset", "subsample_per_class", "load_image", "PseudoSketches", "RandomCropFlips",
    "preprocess_sketch", "preprocess_photo", "training_extras",
]


def check_data_root(data: DataConfig) -> None:
    """The data root and split folder of ``data`` exist (DatasetError saying what to pass): a check that reads no
    list, made before a run writes anything."""
    if data.data_path is not None:
        key, test_class, spec = resolve_split(data.dataset, data.test_class)
        split_folders(Path(data.data_path).expanduser(), spec, key, test_class)


def load_split(data, *, progress: bool = True, check_files: bool = True) -> BenchmarkSplit:
    """The benchmark split of ``data`` (a ``utils.config.DataConfig``, or anything with its split fields: ``data_path``,
    ``dataset``, ``test_class``, ``custom_split``, ``synthetic_dir``): the one place that decides between synthetic
    and real data.

    ``data_path`` None: the built-in synthetic benchmark, drawn into ``synthetic_dir`` (None: its default cache) on
    first use, with a progress bar when ``progress``. ``custom_split`` False: the unseen classes must equal the
    canonical list of ``test_class``. ``check_files``: every listed file must exist.
    """
    if data.data_path is None:
        from .synthetic import ensure_synthetic_benchmark  # lazy: draws images on first use

        root = ensure_synthetic_benchmark(data.synthetic_dir, progress=progress)
        return load_benchmark(root, "sketchy_extend", "test_class_sketchy25", check_canonical=False,
                              check_files=check_files)
    return load_benchmark(data.data_path, data.dataset, data.test_class, check_canonical=not data.custom_split,
                          check_files=check_files)


def build_datasets(config: RunConfig, mask_cache=None) -> dict:
    """The training triplets and the unseen-class query/gallery sets of ``config``.

    ``config.data`` gives the split (:func:`load_split`), the image size, the triplets per epoch, the evaluation
    sets (``testall`` False: the released code's quick-evaluation strides; ``eval_per_class``: at most that many
    queries and gallery photos per class, chosen reproducibly) and the training items' extras
    (:func:`training_extras`); ``config.runtime.seed`` seeds the triplet stream and the subsets.

    ``mask_cache``: precomputed VxL keep-masks (``datasets.mask_cache.MaskCache``, keyed by paths
    relative to ``split.root``); every training photo must be in it (checked here, before
    training), and the training items then carry ``positive_mask`` / ``negative_mask``.

    Returns a dict: ``split`` (BenchmarkSplit), ``train`` (TripletDataset), ``query`` and
    ``gallery`` (ImageListDataset of unseen sketches / photos), ``class_to_idx`` (unseen
    classes sorted → 0..n-1).
    """
    data, seed = config.data, config.runtime.seed
    split = load_split(data, progress=not config.runtime.no_progress)
    mask_lookup = None
    if mask_cache is not None:
        mask_cache.require(split.root, (p for files in split.train_photos.values() for p in files))
        mask_lookup = mask_cache.lookup(split.root)
    train = TripletDataset(sketches=split.train_sketches, photos=split.train_photos, length=data.datasetLen,
                           image_size=data.image_size, seed=seed, mask_lookup=mask_lookup,
                           extras=training_extras(data, seed))

    queries, gallery = split.test_sketches, split.test_photos
    if not data.testall and split.spec is not None:
        queries = queries[::split.spec.sketch_stride]
        gallery = gallery[::split.spec.photo_stride]
    if data.eval_per_class is not None:
        queries = subsample_per_class(queries, data.eval_per_class, seed=seed)
        gallery = subsample_per_class(gallery, data.eval_per_class, seed=seed)

    class_to_idx = {c: i for i, c in enumerate(sorted(split.unseen_classes))}
    return {
        "split": split,
        "train": train,
        "query": ImageListDataset(items=queries, class_to_idx=class_to_idx, kind="sketch",
                                  image_size=data.image_size),
        "gallery": ImageListDataset(items=gallery, class_to_idx=class_to_idx, kind="photo",
                                    image_size=data.image_size),
        "class_to_idx": class_to_idx,
    }


def training_extras(data: DataConfig, seed: int) -> list:
    """The training items' extras (``datasets.sampling``) that the data settings ask for, none in the paper:
    ``pseudo_sketch`` (:class:`PseudoSketches`, each positive photo's outlines drawn as a sketch) and ``augment``
    "crop_flip" (:class:`RandomCropFlips`, applied after the pseudo-sketch so that it is cropped too)."""
    extras = []
    if data.pseudo_sketch:
        extras.append(PseudoSketches(data.image_size))
    if data.augment == "crop_flip":
        extras.append(RandomCropFlips(seed))
    return extras
