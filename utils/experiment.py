"""The experiment folder ``results/<exp>/``: creation rules, the run lock, and ``args.json``."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from utils.io import atomic_write

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class ExperimentError(RuntimeError):
    """The experiment folder cannot be used as asked; the message says why and what to do."""


# What a run (train.py, then test.py) writes into its folder: all that --overwrite deletes.
RUN_FILES = ("args.json", "log.txt", "train.log", "checkpoint.pth", "best.pth", "bad_files.txt",
             "metrics.json", "per_class.csv", "features.npz", LOCK_NAME)
RUN_DIRS = ("tb",)
OVERWRITTEN = ".overwritten"  # where --overwrite keeps the previous run until the new one has a checkpoint


def check_experiment_name(name: str) -> str:
    """``--exp`` must name one folder inside ``--output_dir``: ``..``, ``""`` or a path would let
    ``--overwrite`` delete what lies outside it."""
    if (not name or name.strip() != name or name in (".", "..") or "/" in name
            or (os.altsep and os.altsep in name) or os.sep in name):
        raise ExperimentError(
            f"--exp {name!r}: give a plain folder name (letters, digits, '-', '_', '.'; no '/', not '.' or "
            f"'..', not empty); the run goes to --output_dir/--exp.")
    return name


def _run_files(output_dir: Path) -> list[Path]:
    names = [output_dir / n for n in RUN_FILES if (output_dir / n).is_file()]
    names += [output_dir / d for d in RUN_DIRS if (output_dir / d).is_dir()]
    return names + sorted(output_dir.glob(".*.pth.*.tmp"))  # half-written checkpoints of a killed save


def check_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """:func:`prepare_output_dir`'s refusals, creating and moving nothing (``tools.submit`` checks them before it
    queues a job); returns whether ``output_dir`` holds a run."""
    markers = ["args.json", "log.txt", "checkpoint.pth", "best.pth"]
    if output_dir.exists() and not output_dir.is_dir():
        raise ExperimentError(f"{output_dir} is a file, not an experiment folder: choose another --exp or "
                              f"--output_dir.")
    if output_dir.is_dir():
        RunLock(output_dir).check_free()  # a live run is named first, whatever --resume/--overwrite say
    has_run = output_dir.is_dir() and any((output_dir / m).exists() for m in markers)
    never_saved = has_run and not any((output_dir / m).exists() for m in ("checkpoint.pth", "best.pth"))
    if resume:
        if not (output_dir / "checkpoint.pth").is_file():
            hint = (" That run stopped before it saved its first checkpoint: start it again with --overwrite."
                    if never_saved else " Start the run without --resume (or check --exp / --output_dir).")
            raise ExperimentError(f"--resume: no checkpoint at {output_dir / 'checkpoint.pth'}.{hint}")
    elif has_run and not overwrite:
        if never_saved:
            kept = (f" The run it replaced is still in {output_dir / OVERWRITTEN}: move its files back to restore it."
                    if (output_dir / OVERWRITTEN).is_dir() else "")
            raise ExperimentError(
                f"experiment folder {output_dir} holds a run that stopped before its first checkpoint "
                f"(nothing to resume): --overwrite starts it again, or choose another --exp.{kept}")
        raise ExperimentError(
            f"experiment folder {output_dir} already holds a run. Use --resume to continue it, "
            f"--overwrite to replace it, or choose another --exp."
        )
    return has_run


def prepare_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create ``output_dir``; refuse to reuse one that holds a previous run unless asked to.

    A folder "holds a run" when it has ``args.json``, ``log.txt`` or a checkpoint. ``--resume``
    continues it; ``--overwrite`` deletes the previous run's files (``RUN_FILES``, ``tb/``) and
    nothing else; anything else is an error, so an existing experiment is never overwritten by
    accident.
    """
    has_run = check_output_dir(output_dir, resume=resume, overwrite=overwrite)
    if resume:
        return
    if has_run and overwrite:
        RunLock(output_dir).check_free()
        previous = output_dir / OVERWRITTEN
        if previous.exists():  # an earlier --overwrite never reached its first checkpoint: keep that run
            log.warning("--overwrite: deleting the files of the attempt that stopped before its first checkpoint; "
                        "the run it replaced stays in %s until this run saves one", previous)
            for path in _run_files(output_dir):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        else:  # kept aside, not deleted, until this run has saved a checkpoint: a failing start loses nothing
            previous.mkdir()
            for path in _run_files(output_dir):
                path.rename(previous / path.name)
            log.warning("--overwrite: the previous run in %s is moved to %s and deleted once this run saves its "
                        "first checkpoint", output_dir, previous)
        others = sorted(p.name for p in output_dir.iterdir() if p.name != OVERWRITTEN)
        if others:  # not ours: a user's notes, test.py --out folders, pictures
            log.warning("--overwrite kept what the run did not write in %s: %s", output_dir, ", ".join(others[:10]))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder should be, no permission, ...
        raise ExperimentError(f"cannot create the experiment folder {output_dir} ({e.strerror}: {e.filename}); "
                              f"choose another --output_dir or --exp.") from None


def discard_overwritten(output_dir: Path) -> None:
    """Delete the run that ``--overwrite`` set aside, once the new run has saved a checkpoint."""
    previous = output_dir / OVERWRITTEN
    if previous.is_dir():
        shutil.rmtree(previous)
        log.info("--overwrite: the previous run (%s) is deleted now that this run has a checkpoint", previous)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """A lock file in the experiment folder: one live training process per experiment.

    The file holds ``host pid``. A lock whose process is gone (same host) is stale and is taken over;
    a lock held by a live process makes the second run stop with a message naming that process.
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def _owner(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):
            return None

    def check_free(self) -> None:
        owner = self._owner()
        if owner is None:
            return
        host, pid = owner
        if host != socket.gethostname():
            raise ExperimentError(
                f"{self.path} says process {pid} on host {host} is training this experiment. If that run "
                f"is over, delete the lock file and try again."
            )
        if pid != os.getpid() and _pid_alive(pid):
            raise ExperimentError(
                f"another training process (pid {pid}) is running this experiment ({self.path}). "
                f"Wait for it, stop it, or choose another --exp."
            )

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check_free()  # raises when a live process owns it
                log.warning("removing a stale lock %s left by a process that is gone", self.path)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            self.held = True
            self._remove_stale_temporaries()
            return self
        raise ExperimentError(f"could not take the lock {self.path}; another process keeps creating it.")

    def _remove_stale_temporaries(self) -> None:
        """The folder is ours: drop the half-written checkpoints of a run killed while saving one."""
        for stale in self.path.parent.glob(".*.pth.*.tmp"):
            log.warning("removing %s, left by a run killed while saving a checkpoint", stale)
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def git_output(*args: str) -> str:
    """The output of ``git args`` in the repository; "" when git or the checkout is missing."""
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str | None:
    return git_output("rev-parse", "HEAD") or None


def environment_info() -> dict:
    import numpy
    import open_clip
    import timm
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "open_clip": open_clip.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }


def write_args_json(output_dir: Path, config: dict, name: str = "args.json") -> Path:
    """The run's resolved configuration (``RunConfig.to_dict()``) and its environment; ``train.py --config`` reads
    it back."""
    path = Path(output_dir) / name
    payload = {"config": config, "environment": environment_info()}
    with atomic_write(path) as f:
        f.write(json.dumps(payload, indent=2, default=str))
    return path
