"""User-facing extras with their own main(): benchmarks, visualisation, single-sketch retrieval."""

from __future__ import annotations

import sys


class ToolError(RuntimeError):
    """A problem with the command line or its inputs; printed without a traceback."""


def run_tool(prog: str, run, args):
    """``run(args)``; a bad input (ToolError, DatasetError, CheckpointError) becomes a one-line
    message on stderr and exit code 2 instead of a traceback."""
    from utils.logger import setup_logging

    setup_logging()
    try:
        return run(args)
    except Exception as e:
        from datasets.filelist import DatasetError
        from utils.checkpoint import CheckpointError

        if not isinstance(e, (ToolError, DatasetError, CheckpointError)):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
