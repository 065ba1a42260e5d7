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
authors' code does: ``zeroshot2/cname_cid.txt`` lists its training classes,
``all_photo_filelist_train.txt`` its photos (the authors' list has paths
``ambiguity\\<class>\\<file>.jpg``, relative to ``ROOT/Sketchy``),
``sketch_tx_000000000000_ready_filelist_train.txt`` the Sketchy sketches of those classes,
and ``cname_cid_zero.txt`` + the two ``*_zero.txt`` lists are those of ``zeroshot1`` (the 25
unseen classes). The released lists are broken in two ways: their 50 training classes (934
photos) include 9 of the 25 test classes (cup, harp, pineapple, ray, rifle, snail, squirrel,
swan, volcano), and their sketch list is zeroshot1's 100-class training list looked up by line
number in the 50-class file, so every AM class gets another class's sketches and the 9 test
classes get none. Zero-shot means no file and no class of the test split in training, so for
this split the training classes that are also test classes are left out of training (with a
logged warning naming them and the number of files left out) instead of refused. The released
sketch list is refused (the class of a file is its folder, and most of its 100 classes are not
AM classes); ``python -m datasets.prepare --dataset sketchy_am`` builds the lists without the
test classes (41 classes), with the sketches of each class taken by class name.

For every split, a seen class that is also unseen (other than Sketchy-AM's) and a file listed
for training and for testing are errors: zero-shot retrieval must never train on the test split.
"""
from __future__ import annotations

import logging
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .filelist import DatasetError, read_class_file, read_class_names, read_file_list

__all__ = [
    "BenchmarkSplit", "SplitSpec", "DATASETS", "DATASET_ALIASES", "SPLITS_DIR",
    "resolve_split", "canonical_unseen_classes", "find_missing_files", "find_shared_files",
    "check_split_files", "load_benchmark", "rebuild_command",
]

log = logging.getLogger(__name__)

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
    # Seen classes that are also unseen are left out of training with a warning (Sketchy-AM,
    # whose released classes include test classes) instead of refused.
    leave_out_test_classes: bool = False
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
                                          leave_out_test_classes=True),
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
    root, split_dir = split_folders(data_path, spec, key, test_class)

    seen = read_class_file(split_dir / spec.seen_class_file)
    unseen = read_class_file(split_dir / spec.unseen_class_file)
    both = _check_overlap(split_dir, spec, seen, unseen)
    if check_canonical:
        _check_canonical(split_dir / spec.unseen_class_file, unseen, test_class)

    command = rebuild_command(data_path, key, test_class)
    lists = _read_split_lists(split_dir, spec, seen, unseen, both, command)
    if both:
        seen = _leave_out_test_classes(split_dir, spec, lists, seen, both)
    _check_shared_files(split_dir, spec, lists, command)

    train_sketches, train_photos, test_sketches, test_photos = _split_files(root, split_dir, spec, lists,
                                                                             seen, unseen)
    split = BenchmarkSplit(
        name=f"{key}/{test_class}", root=root, split_dir=split_dir,
        seen_classes=seen, unseen_classes=unseen,
        train_sketches=train_sketches, train_photos=train_photos,
        test_sketches=test_sketches, test_photos=test_photos, spec=spec,
    )
    if check_files:
        check_split_files(split)
    return split


def split_folders(data_path: Path, spec: SplitSpec, key: str, test_class: str) -> tuple[Path, Path]:
    """``(dataset folder, split folder)`` under the data root; an error that says what to pass if one is missing."""
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
    return root, split_dir


def _read_split_lists(split_dir, spec, seen, unseen, both, command) -> dict[str, list[tuple[str, str]]]:
    """The four lists of a split, each checked against its class file (train lists ``seen``, zero lists ``unseen``)."""
    try:
        return {kind: read_file_list(split_dir / fname, seen if kind.endswith("train") else unseen)
                for kind, fname in spec.list_files.items()}
    except DatasetError:
        # A test file listed for training fails the class check: say that it is a test file.
        _check_shared_files(split_dir, spec, _read_lists_unchecked(split_dir, spec, both), command)
        raise


def _split_files(root, split_dir, spec, lists, seen, unseen) -> tuple:
    """``(train sketches, train photos, test sketches, test photos)`` with absolute paths: the training
    files grouped by class, the test files as ``(path, class)``; every class must have files of each kind."""
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
    return train_sketches, train_photos, test_sketches, test_photos


def find_shared_files(lists: dict[str, list[tuple[str, str]]]) -> dict[tuple[str, str], list[str]]:
    """Files listed both for training and for testing: ``(train kind, test kind) -> paths``.

    ``lists`` maps ``sketch_train``/``photo_train``/``sketch_zero``/``photo_zero`` (those present)
    to the items of :func:`read_file_list`; paths are compared after ``posixpath.normpath``, and
    are returned as the test list writes them.
    """
    train: dict[str, str] = {}
    for kind in ("sketch_train", "photo_train"):
        for rel, _ in lists.get(kind, ()):
            train.setdefault(posixpath.normpath(rel), kind)
    shared: dict[tuple[str, str], list[str]] = {}
    for kind in ("sketch_zero", "photo_zero"):
        for rel, _ in lists.get(kind, ()):
            train_kind = train.get(posixpath.normpath(rel))
            if train_kind is not None:
                shared.setdefault((train_kind, kind), []).append(rel)
    return shared


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


def rebuild_command(data_path, key, test_class) -> str:
    """The ``datasets.prepare`` command line that rebuilds every list of a split."""
    for alias, target in DATASET_ALIASES.items():
        if target == (key, test_class):
            return f"python -m datasets.prepare --root {data_path} --dataset {alias} --force"
    return f"python -m datasets.prepare --root {data_path} --dataset {key} --test_class {test_class} --force"


def _check_overlap(split_dir, spec, seen, unseen) -> list[str]:
    """The classes both seen and unseen; an error unless the split leaves them out of training."""
    both = sorted(set(seen) & set(unseen))
    if both and not spec.leave_out_test_classes:
        raise DatasetError(
            f"{split_dir}: classes in both {spec.seen_class_file} and {spec.unseen_class_file}: "
            f"{both}; seen and unseen classes must be disjoint for zero-shot."
        )
    return both


def _read_lists_unchecked(split_dir, spec, both) -> dict[str, list[tuple[str, str]]]:
    """The four lists without class or label checks, the classes ``both`` left out of training ({} if unreadable)."""
    try:
        lists = {kind: read_file_list(split_dir / fname, check_labels=False)
                 for kind, fname in spec.list_files.items()}
    except DatasetError:
        return {}
    _drop_classes(lists, both)
    return lists


def _drop_classes(lists, classes) -> dict[str, int]:
    """Drop the files of ``classes`` from the training lists (in place); returns how many per list."""
    dropped, left_out = set(classes), {}
    for kind in ("sketch_train", "photo_train"):
        kept = [item for item in lists[kind] if item[1] not in dropped]
        left_out[kind] = len(lists[kind]) - len(kept)
        lists[kind] = kept
    return left_out


def _leave_out_test_classes(split_dir, spec, lists, seen, both) -> list[str]:
    """Sketchy-AM: leave the classes ``both`` out of training, with a warning; returns the seen classes left."""
    left_out = _drop_classes(lists, both)
    kept_classes = [c for c in seen if c not in both]
    log.warning(
        "%s: %d training classes of %s are test classes of %s, and zero-shot forbids any test class in "
        "training: they are left out of training (%d training sketches and %d training photos left out, "
        "%d training classes kept): %s", split_dir, len(both), spec.seen_class_file, spec.unseen_class_file,
        left_out["sketch_train"], left_out["photo_train"], len(kept_classes), ", ".join(both))
    if not kept_classes:
        raise DatasetError(f"{split_dir}: every class of {spec.seen_class_file} is a test class; "
                           f"no training class is left.")
    return kept_classes


def _check_shared_files(split_dir, spec, lists, prepare_command, show: int = 5) -> None:
    shared = find_shared_files(lists)
    if not shared:
        return
    names = spec.list_files
    parts = [f"{len(paths)} files are in both {names[train]} (training) and {names[test]} (test), e.g.\n  "
             + "\n  ".join(paths[:show]) for (train, test), paths in shared.items()]
    raise DatasetError(
        f"{split_dir}: " + "\n".join(parts) + "\nZero-shot retrieval must not train on test files. Rebuild the "
        f"lists with `{prepare_command}`, or remove those lines from the training list."
    ) from None


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
