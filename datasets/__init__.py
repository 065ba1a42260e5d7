"""Datasets for PuXIM: the ZSE-SBIR benchmark layout, preprocessing and sampling.

``build_datasets(args)`` is the one entry point that reads an ``args`` object; everything
below it takes explicit keyword arguments.
"""
from __future__ import annotations

from .benchmarks import DATASETS, BenchmarkSplit, load_benchmark
from .filelist import DatasetError, read_class_file, read_file_list
from .sampling import (ImageListDataset, PseudoSketches, RandomCropFlips, TripletDataset, TripletIndexSampler,
                       subsample_per_class)
from .transforms import AUGMENTATIONS, ImageLoadError, load_image, preprocess_photo, preprocess_sketch

__all__ = [
    "build_datasets", "load_split", "load_benchmark", "BenchmarkSplit", "DATASETS", "DatasetError",
    "ImageLoadError", "read_class_file", "read_file_list", "TripletDataset",
    "TripletIndexSampler", "ImageListDataset", "subsample_per_class", "load_image", "PseudoSketches", "RandomCropFlips",
    "preprocess_sketch", "preprocess_photo", "training_extras",
]


def load_split(args) -> BenchmarkSplit:
    """The benchmark split ``args`` names, the one place that decides between synthetic and real data.

    Fields read (with defaults): ``data_path`` (None → the built-in synthetic benchmark, drawn into
    ``synthetic_dir`` (None → its default cache) on first use, with a progress bar unless
    ``no_progress``), ``dataset`` ("sketchy_extend"), ``test_class`` ("test_class_sketchy25"),
    ``custom_split`` (False: the unseen classes must equal the canonical list of ``test_class``),
    ``check_files`` (True: every listed file must exist). A field that is None takes its default.
    """
    def field(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    check_files = field("check_files", True)
    data_path = getattr(args, "data_path", None)
    if data_path is None:
        from .synthetic import ensure_synthetic_benchmark  # lazy: draws images on first use

        root = ensure_synthetic_benchmark(getattr(args, "synthetic_dir", None),  # None: default cache
                                          progress=not field("no_progress", False))
        return load_benchmark(root, "sketchy_extend", "test_class_sketchy25",
                              check_canonical=False, check_files=check_files)
    return load_benchmark(data_path, field("dataset", "sketchy_extend"), field("test_class", "test_class_sketchy25"),
                          check_canonical=not field("custom_split", False), check_files=check_files)


def build_datasets(args, mask_cache=None) -> dict:
    """Build the training triplets and the unseen-class query/gallery sets from ``args``.

    Fields read (with defaults): those of :func:`load_split` (``data_path``, ``synthetic_dir``,
    ``dataset``, ``test_class``, ``custom_split``, ``check_files``, ``no_progress``), then
    ``image_size`` (224), ``datasetLen`` (5000, triplets per epoch), ``seed`` (0), ``testall``
    (True: every unseen sketch and photo; False: the released code's quick-evaluation strides),
    ``eval_per_class`` (None: when set, at most that many queries and gallery photos per class,
    chosen reproducibly), and the training items' extras (:func:`training_extras`): ``pseudo_sketch``
    (False) and ``augment`` ("none").

    ``mask_cache``: precomputed VxL keep-masks (``datasets.mask_cache.MaskCache``, keyed by paths
    relative to ``split.root``); every training photo must be in it (checked here, before
    training), and the training items then carry ``positive_mask`` / ``negative_mask``.

    Returns a dict: ``split`` (BenchmarkSplit), ``train`` (TripletDataset), ``query`` and
    ``gallery`` (ImageListDataset of unseen sketches / photos), ``class_to_idx`` (unseen
    classes sorted → 0..n-1).
    """
    split = load_split(args)

    image_size = getattr(args, "image_size", 224)
    seed = getattr(args, "seed", 0)
    mask_lookup = None
    if mask_cache is not None:
        mask_cache.require(split.root, (p for files in split.train_photos.values() for p in files))
        mask_lookup = mask_cache.lookup(split.root)
    train = TripletDataset(sketches=split.train_sketches, photos=split.train_photos,
                           length=getattr(args, "datasetLen", 5000), image_size=image_size,
                           seed=seed, mask_lookup=mask_lookup, extras=training_extras(args, image_size, seed))

    queries, gallery = split.test_sketches, split.test_photos
    if not getattr(args, "testall", True) and split.spec is not None:
        queries = queries[::split.spec.sketch_stride]
        gallery = gallery[::split.spec.photo_stride]
    per_class = getattr(args, "eval_per_class", None)
    if per_class is not None:
        queries = subsample_per_class(queries, per_class, seed=seed)
        gallery = subsample_per_class(gallery, per_class, seed=seed)

    class_to_idx = {c: i for i, c in enumerate(sorted(split.unseen_classes))}
    return {
        "split": split,
        "train": train,
        "query": ImageListDataset(items=queries, class_to_idx=class_to_idx, kind="sketch",
                                  image_size=image_size),
        "gallery": ImageListDataset(items=gallery, class_to_idx=class_to_idx, kind="photo",
                                    image_size=image_size),
        "class_to_idx": class_to_idx,
    }


def training_extras(args, image_size: int, seed: int) -> list:
    """The training items' extras (``datasets.sampling``) that ``args`` asks for, none in the paper.

    ``pseudo_sketch`` (None or False: none; True: :class:`PseudoSketches`, each positive photo's outlines
    drawn as a sketch) and ``augment`` (one of ``transforms.AUGMENTATIONS``; None or "none": none;
    "crop_flip": :class:`RandomCropFlips`, applied after the pseudo-sketch so that it is cropped too).
    """
    augment = getattr(args, "augment", None) or "none"
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    extras = []
    if getattr(args, "pseudo_sketch", None):
        extras.append(PseudoSketches(image_size))
    if augment == "crop_flip":
        extras.append(RandomCropFlips(seed))
    return extras
