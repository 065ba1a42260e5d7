"""Two CPU processes under torchrun (gloo) train exactly like one process with the same global batch.

One pair of runs serves the module: one process (train.main here: a subprocess would prove nothing more) and two
gloo processes (torchrun: they need their processes), on a copy of the shared benchmark with unreadable images, so
that the same pair shows the steps, losses and metrics matching and the unreadable files counted and listed alike.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from conftest import train_args  # tests/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]


def run_args(root, out, *extra):
    return train_args(root, out, "e", "--epoch", "2", "--datasetLen", "32", "--batch_size", "8", "--dropout", "0",
                      "--seed", "5",
                      # The paper's stem (no BatchNorm): BatchNorm statistics over each process's half batch would
                      # differ from one process's full batch (SyncBatchNorm, used on CUDA, does not run on CPU).
                      "--stem_norm", "none", *extra)


def read_log(out):
    return [json.loads(l) for l in (out / "e" / "log.txt").read_text().splitlines()]


def run_one(root, out, *extra):
    """One process: train.main here (the tests run with one torch thread, as OMP_NUM_THREADS=1 gives torchrun's)."""
    train.main(run_args(root, out, *extra))
    return read_log(out)


def run_two(root, out, *extra):
    """Two gloo processes under torchrun."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(TORCHRUN + run_args(root, out, *extra), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_log(out)


@pytest.fixture(scope="module")
def runs(bench, tmp_path_factory):
    """The module's pair of runs: ``logs`` (log.txt's lines) and ``listed`` (bad_files.txt's sorted lines) of
    ``one`` and ``two`` processes, on a copy of the benchmark with 2 training sketches unreadable (skipped, their
    triplets replaced) and 2 unseen photos unreadable (one in each rank's evaluation shard)."""
    import shutil

    from datasets import load_benchmark

    tmp = tmp_path_factory.mktemp("distributed")
    root = tmp / "bench"
    shutil.copytree(bench, root)
    split = load_benchmark(root, "sketchy_extend", "test_class_sketchy25", check_canonical=False)
    for files in list(split.train_sketches.values())[:2]:
        files[0].write_bytes(b"")  # zero-byte: skipped, its triplet replaced
    for path, _ in split.test_photos[:2]:  # one in each rank's evaluation shard
        path.write_bytes(b"")
    logs, listed = {}, {}
    for name, run in (("one", run_one), ("two", run_two)):
        logs[name] = run(root, tmp / name, "--max_bad_fraction", "0.9")
        listed[name] = sorted((tmp / name / "e" / "bad_files.txt").read_text(encoding="utf-8").splitlines())
    return {"logs": logs, "listed": listed}


def test_two_gloo_processes_match_one_process(runs):
    single, ddp = runs["logs"]["one"], runs["logs"]["two"]
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
        [*TORCHRUN, *train_args(bench, tmp_path, "e", batch_size=7, no_tb_images=False)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "not divisible by the 2 processes" in proc.stdout + proc.stderr


def test_bad_files_are_counted_and_listed_over_all_ranks(runs):
    """Unreadable images: two processes list and count the same training draws as one process, and
    evaluate the same readable unseen photos (an unreadable one in a rank's shard once crashed it)."""
    logs, listed = runs["logs"], runs["listed"]
    assert logs["one"][-1]["bad_files_skipped"] == logs["two"][-1]["bad_files_skipped"] == len(listed["one"]) > 0
    assert listed["two"] == listed["one"]
    assert logs["two"][-1]["test_mAP@all"] == pytest.approx(logs["one"][-1]["test_mAP@all"], abs=1e-4)
