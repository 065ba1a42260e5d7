"""Progress bars draw on a terminal only: a log file or a pipe gets no carriage-return redraws."""
import io

from utils.progress import is_terminal, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_no_bar_when_the_stream_is_not_a_terminal():
    log = io.StringIO()
    assert list(progress_bar(range(300), desc="verifying list.txt", stream=log)) == list(range(300))
    assert log.getvalue() == "" and not is_terminal(log)


def test_a_bar_on_a_terminal_unless_turned_off():
    screen = Terminal()
    bar = progress_bar(range(3), desc="verifying list.txt", stream=screen)
    for _ in bar:
        bar.set_postfix(loss=1.0)  # what training does each step
    bar.close()
    assert "verifying list.txt" in screen.getvalue() and is_terminal(screen)
    quiet = Terminal()
    assert list(progress_bar(range(3), desc="x", stream=quiet, enabled=False)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_every_bar_of_the_project_goes_through_the_helper():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    users = [p.relative_to(root).as_posix() for folder in ("", "datasets", "models", "tools", "utils", "losses")
             for p in (root / folder).glob("*.py")
             if "import tqdm" in p.read_text() or "from tqdm" in p.read_text()]
    assert users == ["utils/progress.py"]
