"""The stop signal of a training run: SIGINT/SIGTERM (or a job scheduler's request) end it after the current step,
with a checkpoint, so that ``--resume`` continues where it stopped."""
from __future__ import annotations

import logging
import signal
from contextlib import contextmanager

__all__ = ["StopFlag"]

log = logging.getLogger("train")


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop stops after the current step and a checkpoint is written. A job
    scheduler's own stop signal does the same through :meth:`request` (tools.submit)."""

    requested: str | None = None  # request()'s reason, for the run training (or starting) in this process

    def __init__(self):
        self.signal = None

    @classmethod
    def request(cls, reason: str) -> None:
        """Stop the run training in this process, or about to, after its current step, as a first SIGTERM
        does. Safe in a signal handler; a SIGTERM that follows is taken as the first signal, not a second."""
        cls.requested = cls.requested or reason

    def __call__(self) -> bool:
        if self.signal is None and StopFlag.requested:  # taken at the next poll, after a step
            self.signal = StopFlag.requested
            log.warning("%s received: finishing this step, then saving a checkpoint.", self.signal)
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """The exit status of a run it stopped: 130 after SIGINT, 143 after SIGTERM (or a signal to another rank)."""
        return 130 if self.signal == "SIGINT" else 143

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and self.signal != StopFlag.requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then saving a checkpoint.", self.signal)

    @classmethod
    @contextmanager
    def installed(cls):
        """A new flag whose handlers take SIGINT and SIGTERM inside the block; the previous handlers come back
        after it (a run called in-process leaves its caller's handlers as they were)."""
        flag, previous = cls(), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, flag._handle)
        try:
            yield flag
        finally:
            for s, handler in previous.items():
                if signal.getsignal(s) is not handler:
                    signal.signal(s, handler)
