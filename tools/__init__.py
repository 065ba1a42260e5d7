"""User-facing extras with their own main(): benchmarks, visualisation, single-sketch retrieval."""

from __future__ import annotations

import sys

import torch


class ToolError(RuntimeError):
    """A problem with the command line or its inputs; printed without a traceback."""


def select_device(name: str) -> torch.device:
    """``--device`` of a tool: ``auto`` (CUDA when available), ``cpu`` or ``cuda`` (ToolError without CUDA)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ToolError("--device cuda was asked but CUDA is not available here (use --device cpu).")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run_tool(prog: str, run, args):
    """``run(args)``; a bad input (ToolError, DatasetError, CheckpointError) becomes a one-line
    message on stderr and exit code 2 instead of a traceback."""
    from utils.logger import setup_logging

    setup_logging()
    try:
        return run(args)
    except Exception as e:
        from datasets.filelist import DatasetError
        from models.encoder import WeightLoadError
        from utils.checkpoint import CheckpointError

        if not isinstance(e, (ToolError, DatasetError, CheckpointError, WeightLoadError)):
            raise
        from utils.errors import user_message

        print(f"{prog}: error: {user_message(e)}", file=sys.stderr)
        raise SystemExit(2) from None
