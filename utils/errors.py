"""Turning a user-facing error into its message (no traceback), wherever it was raised."""

from __future__ import annotations

import re

__all__ = ["user_message"]

_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_message(exc: BaseException) -> str:
    """The message of ``exc`` as the user should read it.

    An error raised inside a DataLoader worker comes back re-raised with the worker's whole traceback
    in its message ("Caught ImageLoadError in DataLoader worker process 0. Original Traceback ...");
    only the original message, the text after the traceback's last ``[module.]ErrorName: ``, is kept.
    """
    text = str(exc)
    if _WORKER_TRACEBACK not in text:
        return text
    name = re.escape(type(exc).__name__)
    matches = list(re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, flags=re.MULTILINE))
    return text[matches[-1].end():].strip() if matches else text
