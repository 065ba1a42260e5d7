"""``--markdown FILE`` of the measuring tools: a measured table as a Markdown results page.

A page written this way holds the table with the date, the commit, the machine and the command line that made
it, so a reader can rerun the command and compare, and a page is regenerated rather than retyped
(docs/results/README.md says which pages are still kept by hand).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

from utils.experiment import git_output

__all__ = ["add_markdown_flag", "machine_description", "provenance", "write_page"]


def add_markdown_flag(parser, what: str = "the table") -> None:
    """The measuring tools' ``--markdown FILE``: ``what`` also written as a results page (:func:`write_page`)."""
    parser.add_argument("--markdown", default=None, metavar="FILE",
                        help=f"also write {what} as a Markdown results page (date, commit, machine, command) to FILE")


def commit_description() -> str:
    """The short commit, with "+ uncommitted changes" when tracked files differ from it (the table was then
    measured with code that no commit holds)."""
    commit = git_output("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes" if git_output("status", "--porcelain", "--untracked-files=no") else "")


def machine_description() -> str:
    """CPU model and cores, GPU when there is one, OS, Python and torch versions (no host name)."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} cores", platform.system() + " " + platform.release(),
             f"Python {platform.python_version()}"]
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        parts += [f"torch {torch.__version__} ({torch.get_num_threads()} threads)", gpu]
    except ImportError:
        pass
    return "; ".join(parts)


def provenance(program: str, argv: list[str] | None = None) -> list[str]:
    """The page's header lines: date, commit, machine, and the command (``python -m program argv``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", program, *argv])
    return [f"- date: {datetime.date.today().isoformat()}", f"- commit: {commit_description()}",
            f"- machine: {machine_description()}", f"- command: `{command}`"]


def write_page(path: str | os.PathLike, title: str, table: str, *, program: str, argv: list[str] | None = None,
               notes: str = "") -> Path:
    """Write ``table`` (Markdown) under ``# title`` with its provenance, then ``notes``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([f"# {title}", "", *provenance(program, argv), "", table.rstrip(), ""])
    if notes:
        text += "\n" + notes.rstrip() + "\n"
    path.write_text(text, encoding="utf-8")
    return path
