"""Two CPU processes under torchrun (gloo) train exactly like one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import train_args  # tests/ is on sys.path

REPO = Path(__file__).resolve().parent.parent


def run(cmd, root, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    args = train_args(root, out, "e", "--epoch", "2", "--datasetLen", "32", "--batch_size", "8", "--dropout", "0",
                      "--seed", "5",
                      # The paper's stem (no BatchNorm): BatchNorm statistics over each process's half batch would
                      # differ from one process's full batch (SyncBatchNorm, used on CUDA, does not run on CPU).
                      "--stem_norm", "none", *extra)
    proc = subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(l) for l in (out / "e" / "log.txt").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(bench, tmp_path):
    single = run([sys.executable, "train.py"], bench, tmp_path / "one")
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"],
              bench, tmp_path / "two")
    assert len(single) == len(ddp) == 2
    for a, b in zip(single, ddp):
        assert a["step"] == b["step"] == (a["epoch"] + 1) * 4
        # the instance loss's negatives are the global batch in both (gathered with their gradients)
        for key in ("train_loss", "train_loss_tri", "train_loss_rec", "train_loss_int", "train_loss_inst"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
        # evaluation is split across the ranks and gathered: the same metrics
        assert b["test_mAP@all"] == pytest.approx(a["test_mAP@all"], abs=1e-4)
    assert single[1]["train_loss"] != single[0]["train_loss"]  # the steps did change the model


def test_batch_not_divisible_by_world_size_is_refused(bench, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         *train_args(bench, tmp_path, "e", batch_size=7, no_tb_images=False)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "not divisible by the 2 processes" in proc.stdout + proc.stderr


def test_bad_files_are_counted_and_listed_over_all_ranks(bench, tmp_path):
    """Unreadable images: two processes list and count the same training draws as one process, and
    evaluate the same readable unseen photos (an unreadable one in a rank's shard once crashed it)."""
    import shutil

    from datasets import load_benchmark

    root = tmp_path / "bench"
    shutil.copytree(bench, root)
    split = load_benchmark(root, "sketchy_extend", "test_class_sketchy25", check_canonical=False)
    for files in list(split.train_sketches.values())[:2]:
        files[0].write_bytes(b"")  # zero-byte: skipped, its triplet replaced
    for path, _ in split.test_photos[:2]:  # one in each rank's evaluation shard
        path.write_bytes(b"")
    logs, listed = {}, {}
    for name, cmd in (("one", [sys.executable, "train.py"]),
                      ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "train.py"])):
        logs[name] = run(cmd, root, tmp_path / name, "--max_bad_fraction", "0.9")
        listed[name] = sorted((tmp_path / name / "e" / "bad_files.txt").read_text(encoding="utf-8").splitlines())
    assert logs["one"][-1]["bad_files_skipped"] == logs["two"][-1]["bad_files_skipped"] == len(listed["one"]) > 0
    assert listed["two"] == listed["one"]
    assert logs["two"][-1]["test_mAP@all"] == pytest.approx(logs["one"][-1]["test_mAP@all"], abs=1e-4)
