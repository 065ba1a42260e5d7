"""The documentation cannot drift from the code unnoticed.

- every relative link and ``#anchor`` of README.md and docs/**/*.md resolves (GitHub's heading slugs);
- every ``python train.py|test.py|-m tools.X|-m datasets.X ...`` line in a fenced block (``torchrun ...
  train.py`` and ``tools.submit ... -- <train.py flags>`` included) parses with that program's own argparse
  parser: a renamed flag or a choice that no longer exists fails here instead of misleading a reader;
- docs/training.md's flag tables are what ``python -m tools.docs_flags`` generates from utils/config.py;
- docs/troubleshooting.md lists exactly the error classes that end a command with exit status 2.
"""
from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HTML_ID = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
SCRIPTS = {"train.py": "train", "test.py": "test"}
MODULE_PACKAGES = ("tools.", "datasets.")


# ---------------------------------------------------------------- Markdown: fenced blocks, headings, links

def split_fences(text: str) -> tuple[str, list[list[str]]]:
    """``(the prose with fenced blocks blanked out, [the lines of each fenced block])``."""
    prose, blocks, fence = [], [], None
    for line in text.splitlines():
        opener = FENCE.match(line)
        if fence is None and opener:
            fence = opener.group(1)
            blocks.append([])
            prose.append("")
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            else:
                blocks[-1].append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation dropped (letters, digits,
    ``_``, ``-`` and spaces stay), spaces turned into ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    """Every ``#anchor`` of a page: its headings' slugs (repeats numbered ``-1``, ``-2`` as GitHub does) and
    explicit ``<a name=...>`` / ``<a id=...>``."""
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    found, seen = set(HTML_ID.findall(prose)), {}
    for match in re.finditer(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", prose, re.MULTILINE):
        slug = github_slug(match.group(1))
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def link_targets(page: Path) -> list[str]:
    """The targets of a page's links and images, outside code (fenced blocks and inline code spans)."""
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    prose = re.sub(r"(`+).*?\1", "", prose, flags=re.DOTALL)
    return LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def broken_link(page: Path, target: str) -> str | None:
    """Why ``target`` (a link on ``page``) does not resolve, or None. External links are not followed."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
        return None
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.exists():
        return f"{target}: no file {file}"
    if anchor and file.suffix == ".md" and anchor not in anchors_of(file):
        return f"{target}: no heading with the anchor #{anchor} in {file}"
    return None


# ---------------------------------------------------------------- commands in fenced blocks

def command_lines(block: list[str]) -> list[str]:
    """The block's commands: ``\\``-continued lines joined, ``$ `` prompts dropped."""
    commands, pending = [], ""
    for line in block:
        line = pending + line.strip().removeprefix("$ ")
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        commands.append(line)
    return commands + ([pending] if pending else [])


def shell_words(command: str) -> list[str]:
    """The words of the first command of a shell line (up to ``|``, ``&&``, ``;``, a redirection), comments
    and ``...`` (the docs' "more flags here") left out."""
    command = re.sub(r"(?<=\s)\d+(?=>)", "", command)  # 2>&1: the descriptor is no argument
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = []
    for word in lexer:
        if word and set(word) <= set("();<>|&"):
            break
        if word != "...":
            words.append(word)
    return words


def program_call(words: list[str]) -> tuple[str, list[str]] | None:
    """``(program, its argv)`` when ``words`` run train.py, test.py, ``-m tools.X`` or ``-m datasets.X``
    (through python or torchrun); None for any other command."""
    if not any(Path(w).name.startswith(("python", "torchrun")) for w in words):
        return None
    for i, word in enumerate(words):
        if Path(word).name in SCRIPTS:
            return SCRIPTS[Path(word).name], words[i + 1:]
        if word == "-m" and i + 1 < len(words) and words[i + 1].startswith(MODULE_PACKAGES):
            return words[i + 1], words[i + 2:]
    return None


class CommandError(Exception):
    pass


def parser_of(program: str):
    """The argparse parser of ``program`` (a module name), from its ``get_args_parser()``."""
    try:
        module = importlib.import_module(program)
    except ImportError as e:
        raise CommandError(f"no module {program} ({e})") from None
    if not hasattr(module, "get_args_parser"):
        raise CommandError(f"{program} has no get_args_parser() to check its flags with")
    parser = module.get_args_parser()
    parser.allow_abbrev = False  # the docs spell flags out: --no_progres must not pass for --no_progress

    def fail(message):
        raise CommandError(f"{program}: {message}")
    parser.error = fail
    return parser


def check_argv(program: str, argv: list[str]) -> None:
    """Parse ``argv`` with the program's parser (tools.submit: its own flags, then train.py's after ``--``);
    raises CommandError naming what does not parse."""
    if program == "tools.submit" and "--" in argv:
        cut = argv.index("--")
        check_argv("train", argv[cut + 1:])
        argv = argv[:cut]
    try:
        parser_of(program).parse_args(argv)
    except SystemExit as e:  # -h prints the help and exits 0
        if e.code:
            raise CommandError(f"{program}: exit {e.code}") from None


def command_problem(command: str) -> str | None:
    """Why a documented command does not parse with its program's parser, or None (also for commands of
    other programs)."""
    try:
        call = program_call(shell_words(command))
        if call is not None:
            check_argv(*call)
    except (CommandError, ValueError) as e:  # ValueError: shlex's unbalanced quotes
        return f"{command}\n    {e}"
    return None


PROGRAM_LINE = re.compile(r"\b(python[\d.]*|torchrun)\b.*(\b(train|test)\.py\b|-m\s+(tools|datasets)\.)")


def documented_commands(page: Path) -> list[str]:
    """The commands of a page's fenced blocks that run one of the project's programs."""
    _, blocks = split_fences(page.read_text(encoding="utf-8"))
    return [c for block in blocks for c in command_lines(block) if PROGRAM_LINE.search(c)]


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_and_anchor_resolves(page):
    broken = [why for target in link_targets(page) if (why := broken_link(page, target))]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_documented_command_parses(page):
    problems = [why for command in documented_commands(page) if (why := command_problem(command))]
    assert not problems, "\n".join(problems)


def test_the_readme_documents_commands():
    assert len(documented_commands(ROOT / "README.md")) >= 5


@pytest.mark.parametrize("command,problem", [
    ("python train.py --exp a --no_such_flag 1", "unrecognized arguments: --no_such_flag"),
    ("python train.py --arch b99", "invalid choice: 'b99'"),
    ("torchrun --nproc_per_node=4 train.py --exp a \\\n    --batch_sise 64", "unrecognized arguments: --batch_sise"),
    ("python -m tools.submit --ngpus 4 -- --exp a --dataset sketchy", "invalid choice: 'sketchy'"),
    ("python -m tools.submit --gpus 4 -- --exp a", "unrecognized arguments: --gpus"),
    ("python -m tools.no_such_tool --x", "no module tools.no_such_tool"),
    ("python -m datasets.prepare --root ROOT --dataset tuberlin   # a comment", "invalid choice: 'tuberlin'"),
    ("python -m datasets.family --benchmark issue_shapes", "required: --out"),
    ("python test.py --exp a --no_progres | tee log", "unrecognized arguments: --no_progres"),
])
def test_the_checker_catches_a_bad_command(command, problem):
    joined = " ".join(command_lines(command.splitlines()))
    why = command_problem(joined)
    assert why is not None and problem in why, why


@pytest.mark.parametrize("command", [
    "python train.py --exp a --arch tiny --epoch 2   # flags that exist",
    "HF_HUB_OFFLINE=1 .venv/bin/python test.py --exp a > log 2>&1",
    "torchrun --nnodes=2 --nproc_per_node=8 train.py ...",
    "python -m tools.submit --ngpus 4 --partition gpu -- --exp a --batch_size 16",
    "python -m pytest -q tests",  # not a program of the project: not checked
    "python train.py -h",
])
def test_the_checker_accepts_a_good_command(command):
    assert command_problem(command) is None


@pytest.mark.parametrize("heading,slug", [
    ("Known limitations (honest status)", "known-limitations-honest-status"),
    ("`--markdown FILE`: tables that regenerate", "--markdown-file-tables-that-regenerate"),
    ("Does it learn beyond the synthetic benchmark?", "does-it-learn-beyond-the-synthetic-benchmark"),
    ("[Clusters](training.md) (SLURM, submitit)", "clusters-slurm-submitit"),
])
def test_github_slugs(heading, slug):
    assert github_slug(heading) == slug


def test_a_broken_anchor_is_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Part one\n\n[ok](#part-one) [bad](#part-two) [gone](missing.md)\n"
                    "```\n[not a link](#in-code)\n```\n")
    problems = [why for t in link_targets(page) if (why := broken_link(page, t))]
    assert len(problems) == 2 and "#part-two" in problems[0] and "missing.md" in problems[1]


def test_the_training_page_lists_every_flag_of_train_py():
    """docs/training.md's "Every flag" tables name exactly train.py's flags (generated from utils/config.py)."""
    import train

    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    section = text.split("## Every flag", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(--[\w-]+)`", section))
    flags = {o for a in train.get_args_parser()._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    assert not flags - documented, f"add to docs/training.md's tables: {sorted(flags - documented)}"
    assert not documented - flags, f"not flags of train.py: {sorted(documented - flags)}"


def test_the_flag_tables_are_generated_from_the_settings():
    """docs/training.md's flag tables are tools.docs_flags' output: a help text, preset value or choice changed in
    utils/config.py or utils/presets.py fails here until the page is regenerated."""
    from tools.docs_flags import REGENERATE, flag_tables, generated_block

    page = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    assert generated_block(page) == flag_tables(), (
        f"docs/training.md's flag tables differ from utils/config.py's settings; regenerate them: {REGENERATE}")


# ---------------------------------------------------------------- troubleshooting: the exit-2 error classes

def project_classes() -> dict[str, list[str]]:
    """Every class defined in the project's code: name -> the names of its bases."""
    classes = {}
    for path in ROOT.rglob("*.py"):
        if {".venv", "tests", ".git"} & set(path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases]
    return classes


def exit_2_error_classes() -> set[str]:
    """The errors a command ends with exit status 2 (utils.runtime.run_cli): UserError, what train.py,
    test.py and the tools pass as user_errors, and every subclass of those in the project."""
    import test as test_script
    import tools
    import train
    from utils.runtime import UserError

    roots = {UserError, *train.user_errors(), *test_script.user_errors(), *tools.tool_errors()}
    names, classes = {c.__name__ for c in roots}, project_classes()
    while True:
        more = {name for name, bases in classes.items() if set(bases) & names} - names
        if not more:
            return names
        names |= more


def documented_error_classes() -> set[str]:
    """The class names in the first column of troubleshooting.md's table of exit-2 errors."""
    text = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    section = text.split("## Errors that end a command with exit status 2", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(\w+)`", section, re.MULTILINE))


def test_troubleshooting_lists_every_exit_2_error_class():
    in_code, documented = exit_2_error_classes(), documented_error_classes()
    assert not in_code - documented, f"add to docs/troubleshooting.md: {sorted(in_code - documented)}"
    assert not documented - in_code, f"no longer exit-2 errors: {sorted(documented - in_code)}"
