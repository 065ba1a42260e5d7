"""Errors reach the user as their message: a DataLoader worker's re-raised traceback is stripped; a user's error
ends a command with its message and exit status 2 (utils.runtime.run_cli)."""
import ast
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datasets.transforms import ImageLoadError
from utils.errors import user_message


class Unreadable(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise ImageLoadError(f"/data/sketch_{i}.png: cannot read the image (zero-byte file)\nremove it from the list")


def test_worker_error_keeps_only_the_original_message():
    with pytest.raises(ImageLoadError) as info:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert "Original Traceback" in str(info.value)  # what torch re-raises ...
    assert user_message(info.value) == ("/data/sketch_0.png: cannot read the image (zero-byte file)\n"
                                        "remove it from the list")  # ... and what the user reads


def test_plain_errors_are_unchanged():
    assert user_message(ValueError("bad --exp")) == "bad --exp"
    assert user_message(RuntimeError("Original Traceback (most recent call last):\nno name line")) \
        == "Original Traceback (most recent call last):\nno name line"


def test_evaluation_with_every_query_unreadable_names_a_file():
    """engine.evaluate: all queries unreadable -> DatasetError naming one, not a shape error from the metrics."""
    import engine
    from datasets.filelist import DatasetError

    class Model(torch.nn.Module):
        def encode(self, images, modality):
            return images.flatten(1)[:, :4]

    def loader(ok):
        n = len(ok)
        return [{"image": torch.rand(n, 3, 2, 2), "label": torch.zeros(n, dtype=torch.long),
                 "index": torch.arange(n), "ok": torch.tensor(ok), "path": [f"/q/{i}.png" for i in range(n)],
                 "errors": [f"/q/{i}.png: truncated" for i in range(n)]}]

    with pytest.raises(DatasetError, match=r"none of the 2 unseen-class queries could be read, e\.g\. /q/0\.png"):
        engine.evaluate(Model(), loader([False, False]), loader([True, True]), device=torch.device("cpu"),
                        progress=False)


# ----------------------------------------------------------------------------- utils.runtime.run_cli

class OtherError(RuntimeError):
    pass


def _fail(exc):
    def run(args):
        raise exc
    return run


def test_run_cli_reports_a_user_error_and_exits_2(caplog):
    import logging

    from utils.runtime import UserError, run_cli

    assert run_cli(lambda args: args + 1, 1) == 2  # no error: run's result
    log = logging.getLogger("some_cli")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exc:
        run_cli(_fail(UserError("--gpu must be a device index such as 0, got 'x'")), None, report=log)
    assert exc.value.code == 2 and exc.value.__suppress_context__  # no traceback chained
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("some_cli", "--gpu must be a device index such as 0, got 'x'")]


def test_run_cli_takes_extra_user_errors_lazily_and_lets_others_through(capsys):
    from utils.runtime import run_cli

    asked = []

    def extra():
        asked.append(1)
        return (OtherError,)

    def report(message):
        print(f"prog: error: {message}")

    with pytest.raises(SystemExit) as exc:
        run_cli(_fail(OtherError("bad input")), None, user_errors=extra, report=report)
    assert exc.value.code == 2 and capsys.readouterr().out == "prog: error: bad input\n"
    with pytest.raises(ValueError, match="a bug"):  # not a user error: its traceback stays
        run_cli(_fail(ValueError("a bug")), None, user_errors=extra, report=report)
    assert capsys.readouterr().out == ""
    assert run_cli(_fail(OtherError("x")), None, user_errors=(OtherError,), report=report, exit_code=1,
                   raise_exit=False) == 1  # a main() that returns its status


def test_run_cli_strips_a_worker_traceback(capsys):
    from utils.runtime import run_cli

    with pytest.raises(ImageLoadError) as info:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    with pytest.raises(SystemExit):
        run_cli(_fail(info.value), None, user_errors=(ImageLoadError,), report=print)
    assert capsys.readouterr().out.startswith("/data/sketch_0.png: cannot read the image (zero-byte file)\n")


def test_train_test_and_tools_share_the_runtime():
    """One UserError, select_device and select_amp (train.UserError stays importable); a ToolError is a UserError."""
    import test as test_script
    import train
    import tools
    from utils import runtime

    assert train.UserError is test_script.UserError is runtime.UserError
    assert train.select_device is runtime.select_device and train.select_amp is runtime.select_amp
    assert issubclass(tools.ToolError, runtime.UserError)
    tree = ast.parse(Path(test_script.__file__).read_text(encoding="utf-8"))  # test.py needs nothing of train.py
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "train" not in imported
