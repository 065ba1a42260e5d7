"""Build the ZSE-SBIR split lists from raw image folders, or check a prepared data root.

Build (``--root`` is the data root, the same folder as ``--data_path``; lists are written to
``ROOT/<dataset dir>/<split dir>/``)::

    python -m datasets.prepare --root ROOT --dataset sketchy_extend --test_class test_class_sketchy25
    python -m datasets.prepare --root ROOT --dataset tu_berlin
    python -m datasets.prepare --root ROOT --dataset Quickdraw
    python -m datasets.prepare --root ROOT --dataset sketchy_am

Raw folders expected under ``ROOT/<dataset dir>/`` (one sub-folder per class):

* Sketchy:    sketches ``256x256/sketch/tx_000000000000_ready/``, photos
  ``256x256/photo/tx_000000000000_ready/`` plus ``EXTEND_image_sketchy_ready/`` when present.
* TU-Berlin:  sketches ``png_ready/``, photos ``ImageResized_ready/``.
* QuickDraw:  sketches ``sketches/``, photos ``images/``.
* Sketchy-AM (``ROOT/Sketchy/zeroshot2``): training photos ``ambiguity/`` (its class folders
  are the released 50 training classes), training sketches from the Sketchy sketch folder,
  by class name; the test side is the 25-class ``zeroshot1`` test side (all unseen
  sketches/photos). The released AM lists put 9 test classes in training (cup, harp,
  pineapple, ray, rifle, snail, squirrel, swan, volcano), and their sketch list is
  zeroshot1's 100-class training list looked up by line number in the 50-class file (every AM
  class gets another class's sketches, the 9 test classes none). Zero-shot means no file and
  no class of the test split in training, so the build leaves the ``ambiguity/`` classes that
  are test classes out of training (41 classes are kept) and says which and how many photos.

The unseen classes are the shipped canonical list (``datasets/splits/``); the seen classes
are every other class folder found. Class ids are the line numbers of ``cname_cid*.txt``
(seen classes sorted by name; unseen classes in canonical order) and each list's labels are
those ids. Existing lists are never overwritten without ``--force``.

Note: this lists every image found. The released ZSE-SBIR Sketchy lists leave out ~5k
sketches (SAKE's cleaning), so prefer the released lists where you have them; ``--check``
shows how a root compares with the published counts.

Check::

    python -m datasets.prepare --check ROOT --dataset sketchy_extend --test_class test_class_sketchy25 [--verify_images]

prints, per list, the number of files and classes found against the published counts,
the missing (and, with ``--verify_images``, unreadable) files, classes that do not match
their class file, and files listed both for training and for testing; exits non-zero when
anything is wrong. (Sketchy-AM's training classes that are also test classes are a note:
training leaves them out.)
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from utils.io import atomic_write
from utils.runtime import run_cli

from .benchmarks import (SplitSpec, canonical_unseen_classes, find_missing_files, find_shared_files,
                         rebuild_command, resolve_split)
from .filelist import DatasetError, read_class_file, read_file_list

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

_SKETCHY_SKETCHES = "256x256/sketch/tx_000000000000_ready"
_SKETCHY_PHOTOS = ("256x256/photo/tx_000000000000_ready", "EXTEND_image_sketchy_ready")


@dataclass(frozen=True)
class RawLayout:
    """Raw image folders of one benchmark, relative to its dataset folder.

    The first photo folder is required, later ones are used when present. ``train_photos``
    (Sketchy-AM) gives separate training photo folders whose class folders define the
    seen classes.
    """

    sketches: tuple[str, ...]
    photos: tuple[str, ...]
    train_photos: tuple[str, ...] | None = None


RAW_LAYOUTS: dict[tuple[str, str], RawLayout] = {
    ("sketchy_extend", "test_class_sketchy25"): RawLayout((_SKETCHY_SKETCHES,), _SKETCHY_PHOTOS),
    ("sketchy_extend", "test_class_sketchy21"): RawLayout((_SKETCHY_SKETCHES,), _SKETCHY_PHOTOS),
    ("sketchy_extend", "test_class_sketchyam"): RawLayout((_SKETCHY_SKETCHES,), _SKETCHY_PHOTOS,
                                                          train_photos=("ambiguity",)),
    ("tu_berlin", "test_class_tuberlin30"): RawLayout(("png_ready",), ("ImageResized_ready",)),
    ("Quickdraw", "test_class_quickdraw30"): RawLayout(("sketches",), ("images",)),
}

# Published counts (shared/REFERENCE.md); None where no count is published.
EXPECTED_COUNTS: dict[tuple[str, str], dict[str, int | None]] = {
    ("sketchy_extend", "test_class_sketchy25"): dict(
        seen_classes=100, unseen_classes=25, sketch_train=55252, photo_train=68401,
        sketch_zero=15229, photo_zero=17101),
    ("sketchy_extend", "test_class_sketchy21"): dict(
        seen_classes=104, unseen_classes=21, sketch_train=57587, photo_train=72949,
        sketch_zero=12694, photo_zero=12553),
    # The released 50 classes (934 photos) less the 9 test classes, which training leaves out.
    ("sketchy_extend", "test_class_sketchyam"): dict(
        seen_classes=41, unseen_classes=25, sketch_train=None, photo_train=None,
        sketch_zero=15229, photo_zero=17101),
    ("tu_berlin", "test_class_tuberlin30"): dict(
        seen_classes=220, unseen_classes=30, sketch_train=15400, photo_train=None,
        sketch_zero=2400, photo_zero=27989),
    ("Quickdraw", "test_class_quickdraw30"): dict(
        seen_classes=80, unseen_classes=30, sketch_train=None, photo_train=None,
        sketch_zero=92291, photo_zero=54151),
}


# ----------------------------------------------------------------------------- build

def scan_class_folders(dataset_dir: Path, subdir: str) -> dict[str, list[str]]:
    """``class -> sorted relative image paths`` for every class folder of ``dataset_dir/subdir``."""
    top = dataset_dir / subdir
    found: dict[str, list[str]] = {}
    with os.scandir(top) as classes:
        for entry in sorted(classes, key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            with os.scandir(entry.path) as files:
                names = sorted(f.name for f in files if f.is_file() and not f.name.startswith(".")
                               and os.path.splitext(f.name)[1].lower() in IMAGE_EXTENSIONS)
            for name in names:
                if "\n" in name or "\r" in name or name != name.strip():
                    raise DatasetError(
                        f"{top / entry.name / name!r}: file name has a line break or leading/"
                        f"trailing space, which the list format cannot hold; rename it."
                    )
            found[entry.name] = [f"{subdir}/{entry.name}/{n}" for n in names]
    return found


def _scan(dataset_dir: Path, subdirs: tuple[str, ...], what: str) -> dict[str, list[str]]:
    """Merge the class folders of several raw folders; the first must exist."""
    merged: dict[str, list[str]] = {}
    for i, sub in enumerate(subdirs):
        if not (dataset_dir / sub).is_dir():
            if i == 0:
                raise DatasetError(
                    f"{dataset_dir / sub}: {what} folder not found; expected class folders of "
                    f"images there (see `python -m datasets.prepare --help`)."
                )
            continue
        for cname, files in scan_class_folders(dataset_dir, sub).items():
            merged.setdefault(cname, []).extend(files)
    return {c: v for c, v in sorted(merged.items()) if v}


def _dataset_dir(root: Path, spec: SplitSpec, layout: RawLayout) -> Path:
    if (root / spec.dataset_dir).is_dir():
        return root / spec.dataset_dir
    if (root / layout.sketches[0]).is_dir():  # --root pointed at the dataset folder itself
        return root
    raise DatasetError(
        f"{root}: neither {root / spec.dataset_dir} nor {root / layout.sketches[0]} exists; "
        f"--root is the data root holding {spec.dataset_dir}/."
    )


def build_lists(root: str | os.PathLike, dataset: str, test_class: str | None = None, *,
                force: bool = False, missing_only: bool = False, out=print) -> dict[str, Path]:
    """Write the class files and file lists of one split; returns ``name -> written path``.

    ``missing_only`` writes only the files the split folder lacks and keeps the others as they are:
    the ZSE-SBIR release ships TU-Berlin without its photo training list and QuickDraw without its
    training lists. An existing seen-class file must then name the classes the folders give.

    Sketchy-AM: training photo classes that are test classes are left out of training; ``out``
    (a print-like callable) gets a note naming them and their photo counts.
    """
    key, test_class, spec = resolve_split(dataset, test_class)
    layout = RAW_LAYOUTS[(key, test_class)]
    root = Path(root).expanduser()
    dataset_dir = _dataset_dir(root, spec, layout)
    unseen = canonical_unseen_classes(test_class)

    sketches, photos, train_photos, seen = _scan_split(dataset_dir, layout, unseen, test_class, out)

    split_dir = dataset_dir / spec.split_dir
    outputs = {spec.seen_class_file: _class_lines(seen), spec.unseen_class_file: _class_lines(unseen),
               spec.sketch_train: _list_lines(sketches, seen),
               spec.photo_train: _list_lines(train_photos, seen),
               spec.sketch_zero: _list_lines(sketches, unseen),
               spec.photo_zero: _list_lines(photos, unseen)}
    existing = [name for name in outputs if (split_dir / name).exists()]
    if existing and missing_only:
        if spec.seen_class_file in existing:  # the new training lists must be about the same classes
            listed = read_class_file(split_dir / spec.seen_class_file)
            if set(listed) != set(seen):
                raise DatasetError(
                    f"{split_dir / spec.seen_class_file} names other seen classes than the folders under "
                    f"{dataset_dir}: only listed {sorted(set(listed) - set(seen))[:10]}, only in folders "
                    f"{sorted(set(seen) - set(listed))[:10]}. Fix the folders, or rebuild every list with --force.")
        outputs = {name: lines for name, lines in outputs.items() if name not in existing}
    elif existing and not force:
        raise DatasetError(
            f"{split_dir}: lists already exist ({', '.join(existing)}); pass --missing_only to write only the "
            f"absent ones, or --force to overwrite them all."
        )
    split_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, lines in outputs.items():
        path = split_dir / name
        with atomic_write(path) as f:
            f.write("".join(line + "\n" for line in lines))
        written[name] = path
    return written


def _scan_split(dataset_dir: Path, layout: RawLayout, unseen: list[str], test_class: str,
                out) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, list[str]], list[str]]:
    """Scan the raw folders of a split; returns ``(sketches, photos, train_photos, seen)``.

    The first three map ``class -> relative image paths`` (``train_photos`` is ``photos`` unless the
    layout has separate training photo folders); ``seen`` is the sorted training classes. Raises
    ``DatasetError`` when a class lacks sketches or photos, or no seen class is found.
    """
    sketches = _scan(dataset_dir, layout.sketches, "sketch")
    photos = _scan(dataset_dir, layout.photos, "photo")
    if layout.train_photos is None:
        train_photos = photos
        only_one = sorted(set(sketches) ^ set(photos))
        if only_one:
            raise DatasetError(
                f"{dataset_dir}: classes with sketches but no photos or the reverse: {only_one}; "
                f"every class needs both (check the raw folders)."
            )
        seen = sorted(set(sketches) - set(unseen))
    else:
        train_photos = _scan(dataset_dir, layout.train_photos, "training photo")
        # Zero-shot: no class of the test split in training, whatever the released list says.
        left_out = [c for c in sorted(train_photos) if c in unseen]
        if left_out:
            out(f"note: {len(left_out)} training classes under {', '.join(layout.train_photos)}/ are test classes "
                f"of {test_class} and are left out of training (zero-shot): "
                + ", ".join(f"{c} ({len(train_photos[c])} photos)" for c in left_out)
                + f"; {sum(len(train_photos[c]) for c in left_out)} photos in all.")
        seen = [c for c in sorted(train_photos) if c not in unseen]
        no_sketch = [c for c in seen if c not in sketches]
        if no_sketch:
            raise DatasetError(f"{dataset_dir}: training classes without sketches: {no_sketch}.")
    absent = [c for c in unseen if c not in sketches or c not in photos]
    if absent:
        raise DatasetError(
            f"{dataset_dir}: unseen classes of {test_class} without sketches or photos: {absent}."
        )
    if not seen:
        raise DatasetError(f"{dataset_dir}: no seen (training) classes found.")
    return sketches, photos, train_photos, seen


def _class_lines(classes: list[str]) -> list[str]:
    return [f"{c} {i}" for i, c in enumerate(classes)]


def _list_lines(files: dict[str, list[str]], classes: list[str]) -> list[str]:
    return [f"{rel} {label}" for label, c in enumerate(classes) for rel in files[c]]


# ----------------------------------------------------------------------------- check

def check_root(root: str | os.PathLike, dataset: str, test_class: str | None = None, *,
               verify_images: bool = False, custom_split: bool = False, show: int = 10, out=print) -> int:
    """Report on a prepared root; returns the number of problems found.

    ``custom_split`` (a split of your own, as ``train.py --custom_split``): the unseen classes need
    not be the canonical ones and no published count applies; every other check runs.
    """
    key, test_class, spec = resolve_split(dataset, test_class)
    expected = {} if custom_split else EXPECTED_COUNTS.get((key, test_class), {})
    split_dir = Path(root).expanduser() / spec.dataset_dir / spec.split_dir
    problems: list[str] = []

    def problem(msg: str, echo: bool = True) -> None:
        problems.append(msg)
        if echo:
            out(f"  PROBLEM: {msg}")

    out(f"Checking {split_dir} ({key} / {test_class}{', custom split' if custom_split else ''})")
    if not Path(root).expanduser().is_dir():
        problem(f"{root}: data root not found (pass the folder that holds {spec.dataset_dir}/)")
        return len(problems)
    if not split_dir.is_dir():
        problem(f"{split_dir}: split folder not found; build its lists with python -m datasets.prepare --root "
                f"{root} --dataset {dataset}")
        return len(problems)

    seen, unseen = _check_classes(split_dir, spec, test_class, expected, custom_split, out, problem)
    lists: dict[str, list[tuple[str, str]]] = {}
    for kind, fname in spec.list_files.items():
        class_list = seen if kind.endswith("train") else unseen
        items = _check_list(split_dir, fname, kind, class_list, expected.get(kind), show, out, problem)
        if items is None:  # unreadable: already a problem
            continue
        lists[kind] = items
        _check_listed_files(split_dir, fname, kind, items, verify_images, show, out, problem)
    for (train, test), paths in find_shared_files(lists).items():
        problem(f"{len(paths)} files are in both {spec.list_files[train]} (training) and {spec.list_files[test]} "
                f"(test), e.g. {', '.join(paths[:show])}; zero-shot retrieval must not train on test files: rebuild "
                f"the lists with `{rebuild_command(root, key, test_class)}`, or remove those lines from "
                f"{spec.list_files[train]}")
    out(f"{'OK' if not problems else f'{len(problems)} problem(s)'}: {split_dir}")
    return len(problems)


def _check_classes(split_dir: Path, spec: SplitSpec, test_class: str, expected: dict, custom_split: bool,
                   out, problem) -> tuple[list[str] | None, list[str] | None]:
    """Check the class files of a split; returns ``(seen, unseen)`` class names, ``None`` for an unreadable file.

    Reports their counts against ``expected``, unseen classes that are not the canonical ones (unless
    ``custom_split``) and classes both seen and unseen (a note where training leaves them out).
    """
    class_files = {"seen_classes": spec.seen_class_file, "unseen_classes": spec.unseen_class_file}
    classes: dict[str, list[str] | None] = {}
    for what, fname in class_files.items():
        try:
            classes[what] = read_class_file(split_dir / fname)
        except DatasetError as err:
            classes[what] = None
            problem(str(err))
    seen, unseen = classes["seen_classes"], classes["unseen_classes"]
    both = sorted(set(seen or ()) & set(unseen or ()))
    for what, fname in class_files.items():
        if classes[what] is not None:  # Sketchy-AM: the seen classes training keeps
            left_out = len(both) if what == "seen_classes" and spec.leave_out_test_classes else 0
            _report_count(out, problem, fname, what, len(classes[what]) - left_out, expected.get(what))
    if unseen is not None and not custom_split:
        canonical = canonical_unseen_classes(test_class)
        extra, absent = sorted(set(unseen) - set(canonical)), sorted(set(canonical) - set(unseen))
        if extra or absent:
            problem(f"{spec.unseen_class_file}: not canonical {extra}; canonical but missing {absent}")
    if both:
        if spec.leave_out_test_classes:
            out(f"  note: {len(both)} classes of {spec.seen_class_file} are also test classes and will be left out "
                f"of training (zero-shot): {both}")
        else:
            problem(f"classes both seen and unseen: {both}")
    return seen, unseen


def _check_list(split_dir: Path, fname: str, kind: str, class_list: list[str] | None, expected: int | None,
                show: int, out, problem) -> list[tuple[str, str]] | None:
    """Read one file list and check its count and classes; returns its ``(path, class)`` items, ``None`` when
    it cannot be read (a problem).

    ``class_list`` is its class file's classes (``None`` when that file could not be read: no class check).
    """
    try:
        items = read_file_list(split_dir / fname)
    except DatasetError as err:
        problem(str(err))
        return None
    _report_count(out, problem, fname, kind, len(items), expected)
    if class_list is not None:
        found = {c for _, c in items}
        stray = sorted(found - set(class_list))
        empty = [c for c in class_list if c not in found]
        if stray:
            problem(f"{fname}: {len(stray)} classes not in its class file: {stray[:show]}")
        if empty:
            problem(f"{fname}: {len(empty)} classes of its class file have no files: {empty[:show]}")
    return items


def _check_listed_files(split_dir: Path, fname: str, kind: str, items: list[tuple[str, str]], verify_images: bool,
                        show: int, out, problem) -> None:
    """Report the missing files of one list and, with ``verify_images``, its unreadable images and blank
    sketches; returns nothing (findings go to ``problem`` and ``out``)."""
    paths = [split_dir.parent / rel for rel, _ in items]
    missing = find_missing_files(paths)
    if missing:
        problem(f"{fname}: {len(missing)} of {len(paths)} listed files are missing, e.g. "
                + ", ".join(str(p) for p in missing[:show]))
    if verify_images:
        blank: list[str] = []
        bad = _unreadable(set(paths) - set(missing), fname, blank if kind.startswith("sketch") else None)
        if bad:
            problem(f"{fname}: {len(bad)} unreadable images, e.g.\n    "
                    + "\n    ".join(bad[:show]))
        if blank:  # readable, and trained on as blank images: worth knowing, not an error
            out(f"  note: {fname}: {len(blank)} blank sketches (no pixel with R+G+B <= 300), e.g. "
                + ", ".join(blank[:show]))


def _report_count(out, problem, fname, what, found, expected) -> None:
    if expected is None:
        out(f"  {fname:<50} {found:>8} {what:<15} (no published count)")
    elif found == expected:
        out(f"  {fname:<50} {found:>8} {what:<15} ok")
    else:
        out(f"  {fname:<50} {found:>8} {what:<15} PROBLEM: published count is {expected}")
        problem(f"{fname}: {found} {what}, published count is {expected}", echo=False)


def _unreadable(paths, fname, blank_out: list | None = None) -> list[str]:
    """Messages of the images that cannot be read; blank ones (no ink) go to ``blank_out`` when given."""
    import numpy as np
    from utils.progress import progress_bar

    from .transforms import ImageLoadError, ink_bbox, load_image

    bad = []
    for p in progress_bar(sorted(paths), desc=f"verifying {fname}", unit="img", leave=False):
        try:
            img = load_image(p)
        except ImageLoadError as err:
            bad.append(str(err))
            continue
        if blank_out is not None and ink_bbox(np.asarray(img)) is None:
            blank_out.append(str(p))
    return bad


# ----------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m datasets.prepare", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--root", help="data root to build the split lists in (raw class folders)")
    mode.add_argument("--check", metavar="ROOT", help="data root to check against the published counts")
    parser.add_argument("--dataset", required=True,
                        choices=["sketchy_extend", "tu_berlin", "Quickdraw", "sketchy_am"])
    parser.add_argument("--test_class", default=None,
                        help="split name, e.g. test_class_sketchy25 (default: the dataset's first)")
    parser.add_argument("--force", action="store_true", help="overwrite existing lists")
    parser.add_argument("--missing_only", action="store_true",
                        help="with --root: write only the lists that do not exist (e.g. the training lists the "
                             "ZSE-SBIR release lacks for TU-Berlin and QuickDraw), keep the others")
    parser.add_argument("--custom_split", action="store_true",
                        help="with --check: a split of your own (no canonical classes, no published counts)")
    parser.add_argument("--verify_images", action="store_true",
                        help="with --check: also open and decode every image (slow)")
    return parser


def main(argv=None) -> int:
    """The exit status: 0, or 1 when a check found problems or the lists could not be built (message on stderr)."""
    args = get_args_parser().parse_args(argv)
    return run_cli(_run, args, user_errors=(DatasetError,), exit_code=1, raise_exit=False,
                   report=lambda message: print(f"error: {message}", file=sys.stderr))


def _run(args) -> int:
    if args.check is not None:
        return 1 if check_root(args.check, args.dataset, args.test_class,
                               verify_images=args.verify_images, custom_split=args.custom_split) else 0
    if args.force and args.missing_only:
        raise DatasetError("--force rewrites every list and --missing_only keeps the existing ones: pick one")
    written = build_lists(args.root, args.dataset, args.test_class, force=args.force,
                          missing_only=args.missing_only)
    for name, path in written.items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"wrote {path} ({n} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
