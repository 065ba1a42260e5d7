"""The ZS-SBIR benchmarks in the ZSE-SBIR / SAKE on-disk layout.

``load_benchmark(ROOT, dataset, test_class)`` reads ``ROOT/<dataset dir>/<split dir>/``:

================  ==========================  ====================================
``--dataset``     ``--test_class``            split folder
================  ==========================  ====================================
sketchy_extend    test_class_sketchy25        ``ROOT/Sketchy/zeroshot1`` (25 unseen)
sketchy_extend    test_class_sketchy21        ``ROOT/Sketchy/zeroshot0`` (21 unseen)
sketchy_extend    test_class_sketchyam        ``ROOT/Sketchy/zeroshot2`` (Sketchy-AM)
tu_berlin         test_class_tuberlin30       ``ROOT/TUBerlin/zeroshot``
Quickdraw         test_class_quickdraw30      ``ROOT/QuickDraw/zeroshot``
================  ==========================  ====================================

``sketchy_am`` is accepted as a shorthand for ``sketchy_extend`` + ``test_class_sketchyam``.

Sketchy-AM (PuXIM's high-ambiguity training set) uses the Sketchy list names, as the
authors' code does: ``zeroshot2/cname_cid.txt`` lists its 50 training classes,
``all_photo_filelist_train.txt`` its 934 photos (the authors' list has paths
``ambiguity\\<class>\\<file>.jpg``, relative to ``ROOT/Sketchy``),
``sketch_tx_000000000000_ready_filelist_train.txt`` the Sketchy sketches of those 50
classes, and ``cname_cid_zero.txt`` + the two ``*_zero.txt`` lists are those of
``zeroshot1`` (the 25 unseen classes). The authors' 50 classes include 9 of the 25 test
classes (cup, harp, pineapple, ray, rifle, snail, squirrel, swan, volcano), so for this split
a seen/unseen overlap is reported as a warning instead of an error.
``python -m datasets.prepare --dataset sketchy_am`` builds these lists.
"""
from __future__ import annotations

import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .filelist import DatasetError, read_class_file, read_class_names, read_file_list

__all__ = [
    "BenchmarkSplit", "SplitSpec", "DATASETS", "DATASET_ALIASES", "SPLITS_DIR",
    "resolve_split", "canonical_unseen_classes", "find_missing_files", "check_split_files",
    "load_benchmark",
]

SPLITS_DIR = Path(__file__).resolve().parent / "splits"

_SKETCHY_LISTS = dict(
    sketch_train="sketch_tx_000000000000_ready_filelist_train.txt",
    photo_train="all_photo_filelist_train.txt",
    sketch_zero="sketch_tx_000000000000_ready_filelist_zero.txt",
    photo_zero="all_photo_filelist_zero.txt",
)


@dataclass(frozen=True)
class SplitSpec:
    """Where one benchmark split lives and what its list files are called."""

    dataset_dir: str  # folder under the data root, e.g. "Sketchy"
    split_dir: str  # folder under the dataset folder, e.g. "zeroshot1"
    canonical: str  # name of the shipped unseen-class list in datasets/splits/
    sketch_train: str
    photo_train: str
    sketch_zero: str
    photo_zero: str
    # The released code's quick-evaluation strides (used when testall is off).
    sketch_stride: int = 1
    photo_stride: int = 1
    allow_overlap: bool = False  # seen/unseen overlap only warns (Sketchy-AM)
    seen_class_file: str = "cname_cid.txt"
    unseen_class_file: str = "cname_cid_zero.txt"

    @property
    def list_files(self) -> dict[str, str]:
        return {"sketch_train": self.sketch_train, "photo_train": self.photo_train,
                "sketch_zero": self.sketch_zero, "photo_zero": self.photo_zero}


DATASETS: dict[str, dict[str, SplitSpec]] = {
    "sketchy_extend": {
        "test_class_sketchy25": SplitSpec("Sketchy", "zeroshot1", "test_class_sketchy25",
                                          **_SKETCHY_LISTS, sketch_stride=20, photo_stride=10),
        "test_class_sketchy21": SplitSpec("Sketchy", "zeroshot0", "test_class_sketchy21",
                                          **_SKETCHY_LISTS, sketch_stride=20, photo_stride=10),
        "test_class_sketchyam": SplitSpec("Sketchy", "zeroshot2", "test_class_sketchy25",
                                          **_SKETCHY_LISTS, sketch_stride=20, photo_stride=10,
                                          allow_overlap=True),
    },
    "tu_berlin": {
        "test_class_tuberlin30": SplitSpec(
            "TUBerlin", "zeroshot", "test_class_tuberlin30",
            sketch_train="png_ready_filelist_train.txt",
            photo_train="ImageResized_ready_filelist_train.txt",
            sketch_zero="png_ready_filelist_zero.txt",
            photo_zero="ImageResized_ready_filelist_zero.txt",
            sketch_stride=3, photo_stride=20),
    },
    "Quickdraw": {
        "test_class_quickdraw30": SplitSpec(
            "QuickDraw", "zeroshot", "test_class_quickdraw30",
            sketch_train="sketch_train.txt", photo_train="all_photo_train.txt",
            sketch_zero="sketch_zero.txt", photo_zero="all_photo_zero.txt",
            sketch_stride=120, photo_stride=30),
    },
}
DATASET_ALIASES = {"sketchy_am": ("sketchy_extend", "test_class_sketchyam")}


@dataclass
class BenchmarkSplit:
    """One loaded benchmark split; every path is absolute (``root / <relative path>``)."""

    name: str
    root: Path  # the dataset folder, e.g. ROOT/Sketchy
    split_dir: Path
    seen_classes: list[str]
    unseen_classes: list[str]
    train_sketches: dict[str, list[Path]]
    train_photos: dict[str, list[Path]]
    test_sketches: list[tuple[Path, str]]
    test_photos: list[tuple[Path, str]]
    spec: SplitSpec | None = field(default=None, repr=False)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "root": str(self.root),
            "seen_classes": len(self.seen_classes),
            "unseen_classes": len(self.unseen_classes),
            "train_sketches": sum(len(v) for v in self.train_sketches.values()),
            "train_photos": sum(len(v) for v in self.train_photos.values()),
            "test_sketches": len(self.test_sketches),
            "test_photos": len(self.test_photos),
        }


def resolve_split(dataset: str, test_class: str | None) -> tuple[str, str, SplitSpec]:
    """Look up ``(dataset, test_class)`` in :data:`DATASETS` (dataset names case-insensitive)."""
    if dataset.lower() in DATASET_ALIASES:
        dataset, alias_class = DATASET_ALIASES[dataset.lower()]
        # Sketchy-AM is tested on the 25-class split, so that name is accepted too.
        if test_class not in (None, alias_class, DATASETS[dataset][alias_class].canonical):
            raise DatasetError(
                f"--dataset sketchy_am takes --test_class {alias_class} (got {test_class!r})."
            )
        test_class = alias_class
    by_lower = {k.lower(): k for k in DATASETS}
    key = by_lower.get(dataset.lower())
    if key is None:
        raise DatasetError(
            f"unknown --dataset {dataset!r}; choose one of {sorted(DATASETS) + sorted(DATASET_ALIASES)}."
        )
    splits = DATASETS[key]
    if test_class is None:
        test_class = next(iter(splits))
    if test_class not in splits:
        raise DatasetError(
            f"unknown --test_class {test_class!r} for --dataset {key}; choose one of {list(splits)}."
        )
    return key, test_class, splits[test_class]


def canonical_unseen_classes(test_class: str) -> list[str]:
    """The shipped canonical unseen-class list for ``test_class`` (``datasets/splits/``)."""
    name = test_class
    for splits in DATASETS.values():
        if test_class in splits:
            name = splits[test_class].canonical
    return read_class_names(SPLITS_DIR / f"{name}.txt")


def find_missing_files(paths, *, limit: int | None = None) -> list[Path]:
    """Return the listed paths that do not exist (all of them, or the first ``limit``).

    One ``os.scandir`` per parent folder instead of one ``stat`` per file, so ~150k paths
    take a fraction of a second. Names not in a listing are re-checked with
    ``os.path.exists`` (case-insensitive file systems, symlinks).
    """
    by_dir: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for p in paths:
        s = os.fspath(p)
        head, tail = os.path.split(s)
        by_dir[head].append((tail, p))
    missing: list[Path] = []
    for folder, entries in by_dir.items():
        try:
            with os.scandir(folder or ".") as it:
                present = {e.name for e in it}
        except OSError:  # folder missing or unreadable: all of its files are missing
            missing.extend(Path(p) for _, p in entries)
            if limit is not None and len(missing) >= limit:
                return missing[:limit]
            continue
        for name, p in entries:
            if name not in present and not os.path.exists(p):
                missing.append(Path(p))
                if limit is not None and len(missing) >= limit:
                    return missing
    return missing


def load_benchmark(
    data_path: str | os.PathLike,
    dataset: str,
    test_class: str | None,
    *,
    check_canonical: bool = True,
    check_files: bool = True,
) -> BenchmarkSplit:
    """Read and validate one benchmark split (see module doc for the layout).

    Args:
        data_path: the data root holding ``Sketchy/``, ``TUBerlin/``, ``QuickDraw/``.
        dataset, test_class: as the ZSE-SBIR command line (``--dataset``, ``--test_class``).
        check_canonical: the unseen classes of ``cname_cid_zero.txt`` must equal the shipped
            canonical list ``datasets/splits/<test_class>.txt`` (order-insensitive).
        check_files: verify that every listed file exists before anything trains.
    """
    key, test_class, spec = resolve_split(dataset, test_class)
    data_path = Path(data_path).expanduser()
    if not data_path.is_dir():
        raise DatasetError(
            f"{data_path}: data root not found. Pass --data_path pointing at the folder that "
            f"holds {spec.dataset_dir}/ (or leave --data_path out to use the synthetic benchmark)."
        )
    root = data_path / spec.dataset_dir
    if not root.is_dir():
        hint = ""
        if (data_path / spec.split_dir).is_dir():
            hint = f" It looks like --data_path is the {spec.dataset_dir} folder itself; pass its parent."
        raise DatasetError(
            f"{root}: dataset folder not found under the data root {data_path}.{hint}"
        )
    split_dir = root / spec.split_dir
    if not split_dir.is_dir():
        raise DatasetError(
            f"{split_dir}: split folder not found. Put the ZSE-SBIR lists there or build them with "
            f"`python -m datasets.prepare --root {data_path} --dataset {key} --test_class {test_class}`."
        )

    seen = read_class_file(split_dir / spec.seen_class_file)
    unseen = read_class_file(split_dir / spec.unseen_class_file)
    _check_overlap(split_dir, spec, seen, unseen)
    if check_canonical:
        _check_canonical(split_dir / spec.unseen_class_file, unseen, test_class)

    lists = {kind: read_file_list(split_dir / fname, seen if kind.endswith("train") else unseen)
             for kind, fname in spec.list_files.items()}

    def absolute(items):
        return [(root / rel, cname) for rel, cname in items]

    train_sketches = _group(absolute(lists["sketch_train"]), seen)
    train_photos = _group(absolute(lists["photo_train"]), seen)
    test_sketches = absolute(lists["sketch_zero"])
    test_photos = absolute(lists["photo_zero"])
    _check_nonempty(split_dir / spec.sketch_train, train_sketches, "seen", "sketches")
    _check_nonempty(split_dir / spec.photo_train, train_photos, "seen", "photos")
    _check_nonempty(split_dir / spec.sketch_zero, _group(test_sketches, unseen), "unseen", "sketches")
    _check_nonempty(split_dir / spec.photo_zero, _group(test_photos, unseen), "unseen", "photos")

    split = BenchmarkSplit(
        name=f"{key}/{test_class}", root=root, split_dir=split_dir,
        seen_classes=seen, unseen_classes=unseen,
        train_sketches=train_sketches, train_photos=train_photos,
        test_sketches=test_sketches, test_photos=test_photos, spec=spec,
    )
    if check_files:
        check_split_files(split)
    return split


def check_split_files(split: BenchmarkSplit, *, show: int = 5) -> None:
    """Raise :class:`DatasetError` when listed files are missing (first ``show`` and the count)."""
    paths = [p for v in split.train_sketches.values() for p in v]
    paths += [p for v in split.train_photos.values() for p in v]
    paths += [p for p, _ in split.test_sketches] + [p for p, _ in split.test_photos]
    missing = find_missing_files(paths)
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:show])
        raise DatasetError(
            f"{len(missing)} of {len(paths)} files listed in {split.split_dir} are missing, e.g.\n"
            f"  {shown}\nDownload/extract the images under {split.root}, or run `python -m "
            f"datasets.prepare --check ...` for a full report.{unicode_normalisation_hint(missing[0])}"
        )


def unicode_normalisation_hint(path: Path) -> str:
    """A sentence for a missing path whose name exists on disk spelt in another Unicode normalisation.

    ``café`` can be written as one code point for ``é`` (NFC, most lists) or ``e`` plus a combining
    accent (NFD, as macOS file systems and some archives write names): they look the same when
    printed, but are different file names on Linux.
    """
    import unicodedata

    path = Path(path)
    current = Path(path.parts[0])
    for part in path.parts[1:]:
        if os.path.lexists(current / part):
            current = current / part
            continue
        try:
            names = os.listdir(current)
        except OSError:
            return ""
        target = unicodedata.normalize("NFC", part)
        for name in names:
            if name != part and unicodedata.normalize("NFC", name) == target:
                return (f"\nNote: {current / name} exists, spelt with another Unicode normalisation than the list's "
                        f"{part!r} (NFC vs NFD: they print the same). Rename the files to NFC (e.g. `convmv -r -f "
                        f"utf8 -t utf8 --nfc --notest DIR`) or rebuild the lists from the files with "
                        f"`python -m datasets.prepare --root ...`.")
        return ""
    return ""


def _group(items, classes) -> dict[str, list[Path]]:
    grouped: dict[str, list[Path]] = {c: [] for c in classes}
    for path, cname in items:
        grouped[cname].append(path)
    return grouped


def _check_overlap(split_dir, spec, seen, unseen) -> None:
    both = sorted(set(seen) & set(unseen))
    if not both:
        return
    msg = (f"{split_dir}: classes in both {spec.seen_class_file} and {spec.unseen_class_file}: "
           f"{both}")
    if spec.allow_overlap:
        warnings.warn(msg + " (expected for Sketchy-AM: its training classes include test classes)",
                      stacklevel=3)
    else:
        raise DatasetError(msg + "; seen and unseen classes must be disjoint for zero-shot.")


def _check_canonical(path, unseen, test_class) -> None:
    canonical = canonical_unseen_classes(test_class)
    extra = sorted(set(unseen) - set(canonical))
    absent = sorted(set(canonical) - set(unseen))
    if extra or absent:
        raise DatasetError(
            f"{path}: the unseen classes differ from the canonical {test_class} split "
            f"(datasets/splits/). Not canonical: {extra}; canonical but missing: {absent}. Use "
            f"the ZSE-SBIR lists, or pass --custom_split for a split of your own."
        )


def _check_nonempty(list_path, grouped, which, what) -> None:
    empty = [c for c, v in grouped.items() if not v]
    if empty:
        raise DatasetError(
            f"{list_path}: {len(empty)} {which} classes have no {what}: {empty[:10]}"
            f"{' ...' if len(empty) > 10 else ''}. Every class of the class file needs files; "
            f"rebuild the lists with `python -m datasets.prepare` or fix the class file."
        )
