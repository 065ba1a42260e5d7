"""Readers for the ZSE-SBIR / SAKE split files.

Two kinds of text file live in a split folder (e.g. ``ROOT/Sketchy/zeroshot1/``):

* class files, ``cname_cid.txt`` (seen classes) and ``cname_cid_zero.txt`` (unseen classes):
  one ``<class name> <id>`` per line. Class names may contain spaces ("alarm clock",
  "palm tree"), so the id is whatever follows the *last* whitespace run.
* file lists: one ``<relative path> <label>`` per line, the path relative to the dataset
  folder (``ROOT/Sketchy``). Paths may contain spaces (split on the last whitespace run),
  and lists written on Windows use ``\\`` separators (the Sketchy-AM list does), which are
  normalised to ``/``.

The class of a listed file is its parent folder's name. The integer labels are local to
each list, so they are not used as class ids; they are only checked for consistency
inside one list (one label per class folder, one class folder per label), which catches a
file that was listed under the wrong folder. Every error names the file and the line.
"""
from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

__all__ = ["DatasetError", "read_class_file", "read_class_names", "read_file_list"]


class DatasetError(Exception):
    """A dataset file or folder is missing or malformed. The message says where and what to do."""


def _read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Return the lines of a UTF-8 text file (BOM and CR line ends tolerated)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"{path}: {what} not found. Check --data_path/--dataset/--test_class, or build the "
            f"split lists with `python -m datasets.prepare`."
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{path}: not valid UTF-8 text ({err}); re-save the {what} as UTF-8."
        ) from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the {what} ({err}).") from None
    return text.splitlines()


def read_class_file(path: str | os.PathLike) -> list[str]:
    """Read a ``cname_cid*.txt`` class file: ``<class name> <integer id>`` per line.

    Returns the class names in file order. Blank lines are skipped; a missing id, a
    non-integer id or a repeated class name is an error naming the line.
    """
    names: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(_read_lines(path, "class file"), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not _is_int(parts[1]):
            raise DatasetError(
                f"{path}, line {lineno}: expected '<class name> <integer id>', got {raw!r}. "
                f"Fix the line (class names may contain spaces; the id comes last)."
            )
        name = parts[0]
        if name in first_line:
            raise DatasetError(
                f"{path}, line {lineno}: class {name!r} is listed again (first on line "
                f"{first_line[name]}); each class must appear once."
            )
        first_line[name] = lineno
        names.append(name)
    if not names:
        raise DatasetError(f"{path}: the class file is empty; it must list at least one class.")
    return names


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Read a plain class-name list (one name per line, no id), e.g. ``splits/*.txt``."""
    names = [line.strip() for line in _read_lines(path, "class list")]
    names = [n for n in names if n]
    if not names:
        raise DatasetError(f"{path}: the class list is empty.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"{path}: classes listed more than once: {duplicates}.")
    return names


def read_file_list(
    path: str | os.PathLike,
    classes: Collection[str] | None = None,
    *,
    check_labels: bool = True,
) -> list[tuple[str, str]]:
    """Read a ``<relative path> <label>`` file list.

    Args:
        path: the list file.
        classes: when given, every file's class (its parent folder) must be one of these —
            the classes of the class file the list belongs to (train lists ↔ ``cname_cid.txt``,
            zero lists ↔ ``cname_cid_zero.txt``).
        check_labels: require the integer labels to be consistent inside this list (each
            class folder has one label and each label one class folder).

    Returns:
        ``[(relative_path, class_name), ...]`` in file order, paths with ``/`` separators.
    """
    allowed = None if classes is None else frozenset(classes)
    items: list[tuple[str, str]] = []
    append = items.append
    seen_paths: dict[str, int] = {}
    label_of: dict[str, tuple[str, int]] = {}  # class -> (label, first line)
    class_of: dict[str, tuple[str, int]] = {}  # label -> (class, first line)
    # One plain loop over the lines; no per-line regex or Path objects, so the 92,291-line
    # QuickDraw list parses in well under a second.
    for lineno, raw in enumerate(_read_lines(path, "file list"), start=1):
        entry = _parse_list_line(path, lineno, raw, allowed)
        if entry is None:
            continue  # blank line
        rel, cname, label = entry
        if rel in seen_paths:
            raise DatasetError(
                f"{path}, line {lineno}: {rel!r} is listed again (first on line "
                f"{seen_paths[rel]}); remove the duplicate."
            )
        seen_paths[rel] = lineno
        if check_labels:
            _check_label(path, lineno, cname, label, label_of, class_of)
        append((rel, cname))
    if not items:
        raise DatasetError(f"{path}: the file list is empty.")
    return items


def _parse_list_line(path, lineno: int, raw: str, allowed: frozenset[str] | None) -> tuple[str, str, str] | None:
    """``(relative path with / separators, class folder, label)`` of one file-list line; None if blank.

    Raises :class:`DatasetError` for a malformed line, an absolute path, a path without a class
    folder, or (``allowed`` given) a class folder that is not in the list's class file.
    """
    parts = raw.rsplit(maxsplit=1)
    if not parts:
        return None
    if len(parts) != 2 or not _is_int(parts[1]):
        raise DatasetError(
            f"{path}, line {lineno}: expected '<relative path> <integer label>', got {raw!r}."
            f" Fix or remove the line."
        )
    rel, label = parts
    rel = rel.strip().replace("\\", "/")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise DatasetError(
            f"{path}, line {lineno}: {rel!r} is an absolute path; list paths must be relative "
            f"to the dataset folder (e.g. '256x256/sketch/tx_000000000000_ready/cup/x.png')."
        )
    folders = rel.rsplit("/", 2)
    if len(folders) < 2 or not folders[-2] or not folders[-1]:
        raise DatasetError(
            f"{path}, line {lineno}: {rel!r} has no class folder; expected "
            f"'<folders>/<class>/<file>' (the class is the parent folder)."
        )
    cname = folders[-2]
    if allowed is not None and cname not in allowed:
        raise DatasetError(
            f"{path}, line {lineno}: class folder {cname!r} of {rel!r} is not in the class "
            f"file for this list ({len(allowed)} classes). The list and the class file do not "
            f"belong together; rebuild them with `python -m datasets.prepare` or fix the line."
        )
    return rel, cname, label


def _check_label(path, lineno, cname, label, label_of, class_of) -> None:
    label = str(int(label))  # "007" and "7" are the same label
    known = label_of.get(cname)
    if known is None:
        other = class_of.get(label)
        if other is not None:
            raise DatasetError(
                f"{path}, line {lineno}: label {label} is used for class folder {cname!r} but "
                f"line {other[1]} uses it for {other[0]!r}; a file may sit in the wrong folder. "
                f"Fix the line or rebuild the list with `python -m datasets.prepare`."
            )
        label_of[cname] = (label, lineno)
        class_of[label] = (cname, lineno)
    elif known[0] != label:
        raise DatasetError(
            f"{path}, line {lineno}: label {label} disagrees with class folder {cname!r}, which "
            f"has label {known[0]} on line {known[1]}; a file may sit in the wrong folder. Fix the "
            f"line or rebuild the list with `python -m datasets.prepare`."
        )


def _is_int(token: str) -> bool:
    token = token[1:] if token[:1] in "+-" else token
    return token.isascii() and token.isdigit()
