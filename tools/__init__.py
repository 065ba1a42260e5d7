"""User-facing extras with their own main(): benchmarks, visualisation, single-sketch retrieval."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

from utils import runtime
from utils.runtime import UserError, run_cli


class ToolError(UserError):
    """A problem with the command line or its inputs; printed without a traceback."""


def select_device(name: str) -> torch.device:
    """``--device`` of a tool (auto/cpu/cuda): ``utils.runtime.select_device`` on GPU 0, quiet about the CPU."""
    return runtime.select_device(SimpleNamespace(device=name, gpu="0"), warn_cpu=False)


def tool_errors() -> tuple:
    """What a tool reports as a message and exit status 2 (with ToolError), not as a traceback."""
    from datasets.filelist import DatasetError
    from models.encoder import WeightLoadError
    from utils.checkpoint import CheckpointError

    return (DatasetError, CheckpointError, WeightLoadError)


def run_tool(prog: str, run, args):
    """``run(args)``; a bad input (ToolError, DatasetError, CheckpointError) becomes a one-line
    message on stderr and exit code 2 instead of a traceback."""
    from utils.logger import setup_logging

    setup_logging()
    return run_cli(run, args, user_errors=tool_errors,
                   report=lambda message: print(f"{prog}: error: {message}", file=sys.stderr))
