"""utils.io.atomic_write, the one atomic write: whole file or the old one, never half, nothing left behind."""
import os
import stat

import numpy as np
import pytest

from utils.io import atomic_write


def test_text_and_binary_content_is_written(tmp_path):
    with atomic_write(tmp_path / "a.json") as f:
        f.write('{"é": 1}\n')
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == '{"é": 1}\n'
    with atomic_write(tmp_path / "sub" / "b.npz", "wb") as f:  # a missing folder is created
        np.savez(f, x=np.arange(3))
    with np.load(tmp_path / "sub" / "b.npz") as data:
        assert data["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "b.npz", "sub"]  # no temporary file left


def test_an_existing_file_is_replaced_with_the_permissions_of_a_plain_write(tmp_path):
    path = tmp_path / "lists.txt"
    path.write_text("old\n")
    with atomic_write(path, newline="") as f:
        f.write("new\r\n")
    assert path.read_bytes() == b"new\r\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["lists.txt"]


def test_a_failure_while_writing_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(path) as f:
            f.write("half of the new")
            f.flush()
            assert path.read_text() == "old"  # nothing visible while it is being written
            1 / 0
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_failed_rename_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space"):
        with atomic_write(path, "wb") as f:
            f.write(b"x")
    assert os.listdir(tmp_path) == []


def test_only_write_modes():
    with pytest.raises(ValueError, match="mode"):
        with atomic_write("never.txt", "a"):
            pass
