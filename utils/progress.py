"""Progress bars that show on a terminal only.

A bar redraws itself with carriage returns: on a terminal that is one line, but in a log file or a pipe
(a batch job, ``cmd > log 2>&1``) every redraw stays, hundreds of them per loop. So every tqdm bar of the
project goes through :func:`progress_bar`, which draws it only when its stream is a terminal.
"""

from __future__ import annotations

import sys
from typing import Iterable, TextIO

__all__ = ["progress_bar", "is_terminal"]


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where tqdm draws) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable, *, desc: str, enabled: bool = True, stream: TextIO | None = None, **kwargs):
    """``tqdm(iterable, desc=...)``, drawn when ``enabled`` and ``stream`` is a terminal; otherwise the same
    object with the bar off (``set_postfix``, ``close`` still work), so a log gets no redraws."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, disable=not (enabled and is_terminal(stream)), file=stream, **kwargs)
