"""What the command lines share: user errors, ``--device``/``--amp``, and a bad input ending as a message.

``train.py``, ``test.py``, the tools and ``python -m datasets.prepare`` run their work through
:func:`run_cli`: an error of the user's (a bad flag, a missing file, a checkpoint of another model...)
is printed as one message, without a traceback, and the command exits with status 2 (``prepare``: 1).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable

import torch

from utils import distributed as dist_utils
from utils.errors import user_message

__all__ = ["UserError", "run_cli", "select_amp", "select_device"]

log = logging.getLogger(__name__)


class UserError(RuntimeError):
    """A problem with the command line or environment; printed without a traceback."""


def run_cli(run: Callable[..., Any], *args, user_errors: Iterable[type] | Callable[[], Iterable[type]] = (),
            report: logging.Logger | Callable[[str], None] | None = None, exit_code: int = 2,
            raise_exit: bool = True):
    """``run(*args)``, with an error of the user's turned into a message and an exit status.

    ``UserError`` (and its subclasses, e.g. ``tools.ToolError``) and the types in ``user_errors`` are the
    user's errors; ``user_errors`` may be a function returning them, so that their modules are imported
    only when an error happens. The message (:func:`utils.errors.user_message`: a DataLoader worker's
    traceback stripped) goes to ``report``: a logger (logged at ERROR level), a function taking the text,
    or None for the root logger. Then ``SystemExit(exit_code)`` is raised, or, with ``raise_exit=False``,
    ``exit_code`` is returned (a ``main()`` that returns its status). Any other exception propagates.
    """
    try:
        return run(*args)
    except Exception as e:
        types = user_errors() if callable(user_errors) else user_errors
        if not isinstance(e, (UserError, *types)):
            raise
        message = user_message(e)
        if report is None or isinstance(report, logging.Logger):
            (report or logging.getLogger()).error("%s", message)
        else:
            report(message)
        if raise_exit:
            raise SystemExit(exit_code) from None
        return exit_code


def select_device(args, *, warn_cpu: bool = True) -> torch.device:
    """``--device`` (auto/cuda/cpu) and ``--gpu`` (default 0) of train.py, test.py and the tools; under
    torchrun, LOCAL_RANK's GPU. ``warn_cpu``: say so when ``auto`` finds no CUDA (the tools stay quiet)."""
    if args.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if args.device == "cuda":
            raise UserError("--device cuda was asked but CUDA is not available here (use --device cpu).")
        if warn_cpu:
            log.warning("CUDA is not available: running on the CPU.")
        return torch.device("cpu")
    if dist_utils.launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        index = int(str(args.gpu).split(",")[0])
    except ValueError:
        raise UserError(f"--gpu must be a device index such as 0, got {args.gpu!r}") from None
    if not 0 <= index < torch.cuda.device_count():
        raise UserError(
            f"--gpu {index} names a missing GPU: {torch.cuda.device_count()} visible. "
            f"For several GPUs use torchrun --nproc_per_node=N."
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def select_amp(args, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` (auto/none/bf16/fp16) on ``device``; None is fp32."""
    if device.type != "cuda":
        if args.amp in ("bf16", "fp16"):
            raise UserError(f"--amp {args.amp} needs a CUDA GPU; on the CPU training runs in fp32 (--amp none).")
        return None
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and newer
    if args.amp == "auto":
        return torch.bfloat16 if native_bf16 else torch.float16
    if args.amp == "bf16" and not native_bf16:
        raise UserError("--amp bf16: this GPU has no bf16 support; use --amp fp16 or --amp none.")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
