"""Checkpoints are written atomically and loaded safely; experiment folders are protected."""

import errno
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch

from utils.checkpoint import (
    CheckpointError, load_checkpoint, load_model_weights, model_state_dict, rng_state, save_checkpoint,
    set_rng_state,
)
from utils.experiment import ExperimentError, RunLock, prepare_output_dir


class Net(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.body = torch.nn.Linear(3, width)
        self.sampler = torch.nn.Linear(2, 2)  # stands for the frozen CLIP, never saved


def test_roundtrip_excludes_sampler(tmp_path):
    net = Net()
    path = save_checkpoint({"model": model_state_dict(net), "epoch": 3, "rng": rng_state()}, tmp_path / "c.pth")
    state = load_checkpoint(path)
    assert set(state["model"]) == {"body.weight", "body.bias"}
    assert state["epoch"] == 3
    other = Net()
    load_model_weights(other, state["model"])
    assert torch.equal(other.body.weight, net.body.weight)
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


def test_rng_state_restores_streams(tmp_path):
    import random

    state = rng_state()
    a = (torch.rand(3), random.random())
    save_checkpoint({"model": {}, "rng": state}, tmp_path / "r.pth")
    set_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"])
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_architecture_mismatch_names_keys(tmp_path):
    save_checkpoint({"model": model_state_dict(Net(width=4))}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"(?s)body.weight: checkpoint \(4, 3\) vs model \(8, 3\).*--arch"):
        load_model_weights(Net(width=8), load_checkpoint(tmp_path / "c.pth")["model"], source="c.pth")


def test_truncated_empty_and_foreign_files_are_refused(tmp_path):
    good = save_checkpoint({"model": model_state_dict(Net())}, tmp_path / "good.pth")
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("hello, not a checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="trunc.pth.*not a readable"):
        load_checkpoint(tmp_path / "trunc.pth")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="text.pth"):
        load_checkpoint(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match="not a PuXIM checkpoint"):
        load_checkpoint(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": {}, "payload": Evil()}, f)
    torch.save({"model": {}, "payload": Evil()}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match="pickled"):
            load_checkpoint(tmp_path / name)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "c.pth")

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(CheckpointError, match="(?s)disk is full.*unchanged"):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]


def test_output_dir_is_never_overwritten_by_accident(tmp_path):
    out = tmp_path / "exp"
    prepare_output_dir(out, resume=False, overwrite=False)
    (out / "log.txt").write_text("{}\n")
    (out / "checkpoint.pth").write_bytes(b"x")
    with pytest.raises(ExperimentError, match="(?s)already holds a run.*--resume.*--overwrite"):
        prepare_output_dir(out, resume=False, overwrite=False)
    prepare_output_dir(out, resume=True, overwrite=False)  # a checkpoint: resumable
    prepare_output_dir(out, resume=False, overwrite=True)
    assert out.is_dir() and not (out / "log.txt").exists() and not (out / "checkpoint.pth").exists()
    assert (out / ".overwritten" / "checkpoint.pth").exists()  # set aside until the new run saves


def test_a_run_that_never_saved_says_overwrite(tmp_path):
    """A run killed or failed before its first checkpoint: both messages point to --overwrite."""
    out = tmp_path / "exp"
    out.mkdir()
    (out / "args.json").write_text("{}")
    with pytest.raises(ExperimentError, match="(?s)stopped before its first checkpoint.*--overwrite starts it again"):
        prepare_output_dir(out, resume=False, overwrite=False)
    with pytest.raises(ExperimentError, match="(?s)no checkpoint.*before it saved its first checkpoint.*--overwrite"):
        prepare_output_dir(out, resume=True, overwrite=False)


def test_overwrite_sets_aside_only_what_a_run_writes_until_the_new_run_saves(tmp_path):
    from utils.experiment import discard_overwritten

    out = tmp_path / "exp"
    (out / "tb").mkdir(parents=True)
    (out / "tb" / "events.out.tfevents.1").write_bytes(b"e")
    for name in ("args.json", "log.txt", "train.log", "best.pth", "metrics.json", ".checkpoint.pth.123.tmp"):
        (out / name).write_text("x")
    (out / "my_notes.md").write_text("keep me")
    (out / "eval_other").mkdir()
    prepare_output_dir(out, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".overwritten", "eval_other", "my_notes.md"]
    assert sorted(p.name for p in (out / ".overwritten").iterdir()) == sorted(
        [".checkpoint.pth.123.tmp", "args.json", "best.pth", "log.txt", "metrics.json", "tb", "train.log"])
    # The new attempt fails before its first checkpoint: a plain run says where the old run is ...
    (out / "args.json").write_text("{}")
    with pytest.raises(ExperimentError, match=r"(?s)--overwrite starts it again.*still in .*\.overwritten"):
        prepare_output_dir(out, resume=False, overwrite=False)
    # ... a second --overwrite drops the failed attempt's files and keeps the old run aside ...
    prepare_output_dir(out, resume=False, overwrite=True)
    assert not (out / "args.json").exists() and (out / ".overwritten" / "best.pth").read_text() == "x"
    # ... and the first checkpoint of the new run deletes it.
    discard_overwritten(out)
    assert sorted(p.name for p in out.iterdir()) == ["eval_other", "my_notes.md"]


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExperimentError, match="cannot create the experiment folder"):
        prepare_output_dir(tmp_path / "afile" / "exp", resume=False, overwrite=False)


def test_overwrite_with_a_bad_data_path_loses_nothing(tmp_path):
    """--overwrite with a mistyped data root stops before the old run is touched; with a root whose split lacks its
    lists, the old run is set aside (.overwritten) when the error comes, not deleted."""
    import train
    from conftest import empty_data_root

    out = tmp_path / "results" / "e"
    out.mkdir(parents=True)
    (out / "best.pth").write_bytes(b"weights")
    (out / "args.json").write_text("{}")
    for root in (tmp_path / "typo", empty_data_root(tmp_path / "no_lists")):
        with pytest.raises(SystemExit) as exc:
            train.main(["--exp", "e", "--output_dir", str(tmp_path / "results"), "--overwrite", "--data_path",
                        str(root), "--arch", "tiny", "--device", "cpu", "--no_progress"])
        assert exc.value.code == 2
        if root.name == "typo":
            assert (out / "best.pth").read_bytes() == b"weights" and not (out / ".overwritten").exists()
    assert (out / ".overwritten" / "best.pth").read_bytes() == b"weights"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "/abs", " padded"])
def test_experiment_name_must_be_one_folder(name):
    from utils.experiment import check_experiment_name

    with pytest.raises(ExperimentError, match="plain folder name"):
        check_experiment_name(name)


def test_experiment_name_accepts_plain_names():
    from utils.experiment import check_experiment_name

    for name in ("sketchy25", "run-1_b16.v2", "é"):
        assert check_experiment_name(name) == name


def test_train_refuses_exp_dotdot_with_overwrite_and_deletes_nothing(tmp_path):
    """--exp .. --overwrite once deleted everything beside the experiments folder."""
    import train

    results = tmp_path / "results"
    (results / "precious").mkdir(parents=True)
    (results / "precious" / "best.pth").write_bytes(b"keep")
    (tmp_path / "args.json").write_text("{}")  # --output_dir/.. 'holds a run'
    with pytest.raises(SystemExit) as exc:
        train.main(["--exp", "..", "--output_dir", str(results), "--overwrite", "--device", "cpu", "--no_progress"])
    assert exc.value.code == 2
    assert (results / "precious" / "best.pth").read_bytes() == b"keep" and (tmp_path / "args.json").exists()


def test_lock_refuses_live_owner_and_takes_over_stale(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(ExperimentError, match="another training process"):
            # a second process would see our live pid; simulate by a lock owned by a live other pid
            other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            try:
                (tmp_path / ".lock").write_text(f"{socket.gethostname()} {other.pid}\n")
                RunLock(tmp_path).acquire()
            finally:
                other.kill()
                other.wait()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    lock = RunLock(tmp_path).acquire()  # stale: its process is gone
    assert (tmp_path / ".lock").read_text().split()[1] == str(os.getpid())
    lock.release()
    assert not (tmp_path / ".lock").exists()
