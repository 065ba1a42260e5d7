"""Writing a file whole or not at all: the one atomic write of the repository."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write", "fsync_dir", "temp_name"]


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``.NAME.RANDOM.tmp`` (hidden; ``.*.pth.*.tmp`` for checkpoints)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str = "utf-8",
                 newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the block ends without error it becomes ``path``.

    What the block writes goes to a temporary file in ``path``'s folder (created if missing), which is
    flushed and fsync'ed, then renamed over ``path`` (``os.replace``); the folder is fsync'ed too where
    the OS allows, so that the rename itself survives a crash. A reader, a crash, SIGKILL or a full disk
    thus sees the old file or the new one, never half of one. If the block raises (or the write fails),
    the temporary file is removed, ``path`` is left as it was, and the exception propagates.

    ``mode`` is ``"w"`` (text, with ``encoding`` and ``newline`` as in :func:`open`) or ``"wb"`` (binary).
    The new file gets the permissions of a plain ``open(path, "w")`` (``0o666`` less the umask).

        with atomic_write(path, "wb") as f:
            torch.save(state, f)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue
    try:
        text = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
