"""Failure is boring: kills, signals, bad checkpoints, locks, bad images, NaN, full disks, unicode.

Every test drives the real train.py / test.py (in a subprocess where the process boundary matters:
SIGKILL, a scheduler's SIGTERM, exit codes; in-process elsewhere, to keep the module fast) on a tiny
synthetic benchmark (3 seen + 2 unseen classes, 64 px, the ``tiny`` preset on the CPU).

One uninterrupted run (``baseline``) is the reference: every interrupted-then-resumed run must end
with its number of epochs and optimizer steps, and with its weights.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import test as test_script
import train
from conftest import png_claiming, train_args  # tests/ is on sys.path (pytest prepends a test file's folder)
from utils.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 12  # --datasetLen 12 --batch_size 1: long enough to be killed in the middle (a kill lands a
# third of epoch 0's duration into epoch 1), short enough for the runs that all start from scratch
EPOCHS = 2
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
TIMEOUT = 180  # seconds any one subprocess may take before the test gives up


# ------------------------------------------------------------------------------------------------
# Shared data, arguments and helpers
# ------------------------------------------------------------------------------------------------
# bench (conftest.py): the shared drawn benchmark, 3 seen + 2 unseen classes (8 sketches and 8 photos per seen
# class, 4 of each per unseen class); train_args (conftest.py): the flags every run here shares.
# The reference schedule: 2 epochs of 24 one-triplet steps, evaluated once at the end.
SCHEDULE = ("--epoch", str(EPOCHS), "--datasetLen", str(STEPS_PER_EPOCH), "--batch_size", "1",
            "--eval_every", str(EPOCHS))


def spawn(args: list[str], log_path: Path, script: str = "train.py") -> subprocess.Popen:
    log_file = open(log_path, "w", encoding="utf-8")  # a file, not a pipe: the child never blocks
    proc = subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=ENV, stdout=log_file,
                            stderr=subprocess.STDOUT)
    log_file.close()
    return proc


def output_of(log_path: Path) -> str:
    return log_path.read_text(encoding="utf-8", errors="replace")


def handles_sigterm(pid: int) -> bool:
    """True once the process has installed a SIGTERM handler (train.py's StopFlag), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def wait_until_training(proc: subprocess.Popen, log_path: Path) -> None:
    """Block until ``proc`` installed its signal handlers, i.e. is about to enter the epoch loop."""
    deadline = time.monotonic() + TIMEOUT
    while not handles_sigterm(proc.pid):
        assert proc.poll() is None, f"train.py ended early (rc {proc.returncode}):\n{output_of(log_path)}"
        assert time.monotonic() < deadline, "train.py never started training"
        time.sleep(0.005)


def read_log(folder: Path) -> list[dict]:
    path = folder / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def baseline(bench, tmp_path_factory) -> dict:
    """The uninterrupted reference run."""
    out = tmp_path_factory.mktemp("baseline")
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    result = train.main(train_args(bench, out, "base", *SCHEDULE))
    ckpt = load_checkpoint(out / "base" / "checkpoint.pth")
    return {"global_step": result["global_step"], "epochs": [l["epoch"] for l in read_log(out / "base")],
            "model": ckpt["model"], "folder": out / "base",
            "handlers": (handlers, [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)])}


def test_baseline_schedule(baseline):
    assert baseline["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert baseline["epochs"] == list(range(EPOCHS))


def test_training_restores_signal_handlers(baseline):
    """train.main() called in-process (a notebook, a test) must give SIGINT/SIGTERM back afterwards."""
    before, after = baseline["handlers"]
    assert after == before


# ------------------------------------------------------------------------------------------------
# 1 + 4. SIGKILL mid-epoch; the checkpoint is readable at every moment; the run lock
# ------------------------------------------------------------------------------------------------
POSIX_PROC = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="reads signal dispositions from /proc (Linux)")


@POSIX_PROC
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(bench, baseline, tmp_path, caplog):
    out = tmp_path / "results"
    folder = out / "killed"
    ckpt = folder / "checkpoint.pth"
    log_path = tmp_path / "killed.out"
    proc = spawn(train_args(bench, out, "killed", *SCHEDULE), log_path)
    reads, first_seen, refused = 0, None, None
    try:
        wait_until_training(proc, log_path)
        started = time.monotonic()
        deadline = started + TIMEOUT
        kill_after = None  # a third of epoch 0's duration after epoch 0's checkpoint: inside epoch 1
        while kill_after is None or time.monotonic() - first_seen < kill_after:
            assert proc.poll() is None, f"train.py ended (rc {proc.returncode}):\n{output_of(log_path)}"
            assert time.monotonic() < deadline, "no checkpoint.pth appeared"
            if ckpt.exists():
                load_checkpoint(ckpt)  # every read of checkpoint.pth must load, whenever it happens
                reads += 1
                if first_seen is None:
                    first_seen = time.monotonic()
                    kill_after = (first_seen - started) / 3
            else:
                assert first_seen is None, "checkpoint.pth disappeared while the run was writing it"
            if first_seen is not None and refused is None:
                # 4. a second run of the same experiment while the first is alive: refused by the lock
                # (with --resume, so the "folder already holds a run" rule is not what refuses it)
                assert (folder / ".lock").read_text().split()[1] == str(proc.pid)
                caplog.clear()
                with pytest.raises(SystemExit) as exc:
                    train.main(train_args(bench, out, "killed", *SCHEDULE, "--resume"))
                refused = (exc.value.code, caplog.text)
                with pytest.raises(SystemExit) as exc:  # --overwrite must not delete a live run either
                    train.main(train_args(bench, out, "killed", *SCHEDULE, "--overwrite"))
                assert exc.value.code == 2 and ckpt.is_file()
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(TIMEOUT) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert refused[0] == 2 and "another training process" in refused[1] and str(proc.pid) in refused[1]
    assert reads >= 1
    state = load_checkpoint(ckpt)
    # killed in epoch 1, after the end-of-epoch-0 checkpoint and before the end of epoch 1
    assert (state["next_epoch"], state["skip_batches"], state["global_step"]) == (1, 0, STEPS_PER_EPOCH)
    assert [l["epoch"] for l in read_log(folder)] == [0]
    assert temp_files(folder) == []
    # the dead process's lock is stale: it must not block the resumed run
    assert (folder / ".lock").read_text().split()[1] == str(proc.pid)

    result = train.main(train_args(bench, out, "killed", *SCHEDULE, "--resume"))
    assert result["global_step"] == baseline["global_step"]
    assert [l["epoch"] for l in read_log(folder)] == baseline["epochs"]
    final = load_checkpoint(ckpt)
    assert final["global_step"] == baseline["global_step"] and final["next_epoch"] == EPOCHS
    assert_same_weights(final["model"], baseline["model"])
    assert not (folder / ".lock").exists() and temp_files(folder) == []


def test_stale_lock_and_half_written_checkpoint_of_dead_process(bench, baseline, tmp_path):
    """A process killed while saving leaves its lock and a temporary file: neither blocks nor stays."""
    import socket

    folder = tmp_path / "stale"
    shutil.copytree(baseline["folder"], folder)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    half = (folder / "checkpoint.pth").read_bytes()[:100_000]
    (folder / ".checkpoint.pth.x7k2q9.tmp").write_bytes(half)  # as save_checkpoint's atomic_write names it
    result = train.main(train_args(bench, tmp_path, "stale", *SCHEDULE, "--resume", "--epoch", str(EPOCHS + 1),
                                 "--eval_every", "10"))
    assert result["global_step"] == (EPOCHS + 1) * STEPS_PER_EPOCH
    assert not (folder / ".lock").exists()
    assert temp_files(folder) == []


# ------------------------------------------------------------------------------------------------
# 2. SIGTERM (a scheduler) and SIGINT (Ctrl-C): checkpoint mid-epoch, exit 143/130, resume exactly
# ------------------------------------------------------------------------------------------------
@POSIX_PROC
def signal_once_training(argv: list, log_path: Path, signum: int) -> tuple[int, str]:
    """Spawn train.py, send ``signum`` as soon as it trains; its exit status and output."""
    proc = spawn(argv, log_path)
    try:
        wait_until_training(proc, log_path)
        proc.send_signal(signum)
        rc = proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, output_of(log_path)


def test_sigterm_and_sigint_checkpoint_mid_epoch_and_resume_exactly(bench, baseline, tmp_path, caplog):
    out = tmp_path / "results"
    folder = out / "sig"
    log_path = tmp_path / "sig.out"

    # SIGTERM to a train.py process as soon as it trains: it finishes the step, saves, exits 143
    rc, text = signal_once_training(train_args(bench, out, "sig", *SCHEDULE), log_path, signal.SIGTERM)
    assert rc == 143, text
    assert "SIGTERM" in text and "--resume" in text and "Traceback" not in text, text
    first = load_checkpoint(folder / "checkpoint.pth")
    assert first["next_epoch"] == 0 and 0 < first["skip_batches"] < STEPS_PER_EPOCH, first["skip_batches"]
    assert first["global_step"] == first["skip_batches"]
    assert read_log(folder) == [] and not (folder / ".lock").exists()

    # SIGINT (Ctrl-C) to the resumed run, in this process: exit 130, further along in the same epoch
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    done = threading.Event()

    def ctrl_c_once_training():
        while signal.getsignal(signal.SIGTERM) is handlers[signal.SIGTERM]:  # StopFlag not installed yet
            if done.wait(0.002):
                return
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=ctrl_c_once_training, daemon=True)
    thread.start()
    caplog.clear()
    try:
        with pytest.raises(SystemExit) as exc:
            train.main(train_args(bench, out, "sig", *SCHEDULE, "--resume"))
    finally:
        done.set()
        thread.join()
    assert exc.value.code == 130
    assert "SIGINT" in caplog.text and "--resume" in caplog.text
    assert {s: signal.getsignal(s) for s in handlers} == handlers, "train.main left its signal handlers"
    second = load_checkpoint(folder / "checkpoint.pth")
    assert second["next_epoch"] == 0 and first["skip_batches"] < second["skip_batches"] < STEPS_PER_EPOCH
    assert second["global_step"] == second["skip_batches"]

    # the last resume finishes the schedule: same steps, epochs and weights as the uninterrupted run
    result = train.main(train_args(bench, out, "sig", *SCHEDULE, "--resume"))
    assert result["global_step"] == baseline["global_step"]
    assert [l["epoch"] for l in read_log(folder)] == baseline["epochs"]
    assert_same_weights(load_checkpoint(folder / "checkpoint.pth")["model"], baseline["model"])
    # ... and the same log: the interrupted epoch's line averages all of its steps, not only the last part
    for resumed, reference in zip(read_log(folder), read_log(baseline["folder"])):
        assert resumed["train_steps"] == reference["train_steps"] == STEPS_PER_EPOCH
        for key in ("train_loss", "train_loss_tri", "train_loss_rec", "train_loss_int", "test_mAP@all"):
            if key in reference:  # test_mAP@all only in the evaluated (last) epoch
                assert resumed[key] == pytest.approx(reference[key], rel=1e-6), key
            else:
                assert key not in resumed, key


# ------------------------------------------------------------------------------------------------
# 3. Bad checkpoints through test.py --checkpoint and train.py --resume
# ------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs code (it touches a marker file): a checkpoint must never do that."""

    marker = None

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def make_bad_checkpoint(kind: str, good: Path, dest: Path, marker: Path) -> Path:
    if kind == "truncated":
        data = good.read_bytes()
        dest.write_bytes(data[: len(data) // 2])
    elif kind == "not_a_checkpoint":
        dest.write_text("epoch 3: loss 0.41\n", encoding="utf-8")
    elif kind == "pickled_code":
        state = load_checkpoint(good)
        payload = Payload()
        payload.marker = str(marker)
        state["payload"] = payload
        torch.save(state, dest)
    elif kind == "other_arch":  # the same weights, described as a --separate_encoders model
        state = load_checkpoint(good)
        state["config"]["model"]["separate_encoders"] = True
        save_checkpoint(state, dest)
    elif kind == "folder":
        dest.mkdir()
    elif kind == "newer_format":
        state = load_checkpoint(good)
        state["format"] = 99
        save_checkpoint(state, dest)
    elif kind == "state_dict":  # weights alone, as other repositories save them
        torch.save(load_checkpoint(good)["model"], dest)
    return dest


BAD_CHECKPOINTS = {
    "truncated": "not a readable PyTorch checkpoint",
    "not_a_checkpoint": "not a readable PyTorch checkpoint",
    "pickled_code": "pickled Python objects or code",
    "other_arch": "does not match this model's architecture",
    "folder": "is a folder: pass the .pth file inside it",
    "newer_format": f"newer than this code reads ({CHECKPOINT_FORMAT}): update this repository",
    "state_dict": "not a PuXIM checkpoint (no 'model' entry): use a checkpoint.pth or best.pth",
}


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_test_py_refuses_bad_checkpoint(kind, baseline, tmp_path, caplog):
    marker = tmp_path / "code_ran"
    bad = make_bad_checkpoint(kind, baseline["folder"] / "best.pth", tmp_path / f"{kind}.pth", marker)
    caplog.clear()
    with pytest.raises(SystemExit) as exc:
        test_script.main(["--checkpoint", str(bad), "--out", str(tmp_path / "eval"), "--num_workers", "0",
                          "--device", "cpu", "--no_progress"])
    assert exc.value.code == 2
    assert str(bad) in caplog.text and BAD_CHECKPOINTS[kind] in caplog.text, caplog.text
    assert not marker.exists(), "loading the checkpoint ran its pickled code"
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_test_py_refuses_an_out_that_is_a_file_before_evaluating(baseline, tmp_path, caplog):
    out = tmp_path / "results.txt"
    out.write_text("mine")
    caplog.clear()
    with pytest.raises(SystemExit) as exc:
        test_script.main(["--checkpoint", str(baseline["folder"] / "best.pth"), "--out", str(out),
                          "--num_workers", "0", "--device", "cpu", "--no_progress"])
    assert exc.value.code == 2 and f"--out {out} is a file" in caplog.text
    assert out.read_text() == "mine" and "embed" not in caplog.text


@pytest.mark.parametrize("kind", ["truncated", "not_a_checkpoint", "pickled_code", "separate_encoders",
                                  "batch_size"])
def test_resume_refuses_bad_checkpoint(kind, bench, baseline, tmp_path, caplog):
    folder = tmp_path / "exp"
    shutil.copytree(baseline["folder"], folder)
    ckpt = folder / "checkpoint.pth"
    marker = tmp_path / "code_ran"
    extra = []
    if kind == "separate_encoders":  # resumed with another architecture than it was trained with
        extra, expected = ["--separate_encoders"], "--separate_encoders"
    elif kind == "batch_size":  # another triplet stream: not the run it claims to continue
        extra, expected = ["--batch_size", "2"], "--batch_size 2 (the run has 1)"
    else:
        make_bad_checkpoint(kind, baseline["folder"] / "checkpoint.pth", ckpt, marker)
        expected = BAD_CHECKPOINTS[kind]
    before = sha(ckpt)
    caplog.clear()
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(bench, tmp_path, "exp", *SCHEDULE, "--resume", "--epoch", str(EPOCHS + 1), *extra))
    assert exc.value.code == 2
    assert str(ckpt) in caplog.text and expected in caplog.text, caplog.text
    assert not marker.exists(), "loading the checkpoint ran its pickled code"
    assert sha(ckpt) == before, "a refused checkpoint must be left as it is"
    assert not (folder / ".lock").exists()


def test_resume_argument_check_accepts_same_run_and_logs_harmless_changes(tmp_path, caplog, monkeypatch):
    from utils.config import ConfigError, make_config
    from utils.train_state import check_resume_config

    data = tmp_path / "data"
    data.mkdir()
    saved = {"data_path": str(data), "batch_size": 8, "seed": 0, "lr": 1e-5, "epoch": 10}
    monkeypatch.chdir(tmp_path)

    def check(saved_args, **ours):  # a format-1 checkpoint: tri_distance / w_cls / ... absent from it
        settings = {**dict(data_path="data", batch_size=8, seed=0, lr=1e-4, epoch=20), **ours}  # a relative path
        check_resume_config(make_config("b16", **settings), {"args": saved_args}, tmp_path / "checkpoint.pth")

    caplog.clear()
    with caplog.at_level("INFO"):
        check(saved)
    assert "--lr 0.0001 (was 1e-05)" in caplog.text and "--epoch 20 (was 10)" in caplog.text
    with pytest.raises(ConfigError, match="--data_path .*other.* would make it another run"):
        check(saved, data_path=str(tmp_path / "other"))
    # CLIP weights: the same file moved is the same run; another file is not.
    (tmp_path / "old.pt").write_bytes(b"clip")
    (tmp_path / "moved.pt").write_bytes(b"clip")
    (tmp_path / "other.pt").write_bytes(b"clap")
    saved["clip_weights"] = str(tmp_path / "old.pt")
    check(saved, clip_weights=str(tmp_path / "moved.pt"))
    with pytest.raises(ConfigError, match="--clip_weights"):
        check(saved, clip_weights=str(tmp_path / "other.pt"))
    # Today's tiny defaults against a checkpoint from before --tri_distance / --w_cls: refused, naming both.
    moved = str(tmp_path / "moved.pt")
    with pytest.raises(ConfigError) as refused:
        check(saved, clip_weights=moved, tri_distance="cosine", w_cls=1.0)
    assert "--tri_distance 'cosine' (the run has 'euclidean')" in str(refused.value)
    assert "--w_cls 1.0 (the run has 0.0)" in str(refused.value)
    check({**saved, "tri_distance": "cosine", "w_cls": 1.0}, clip_weights=moved, tri_distance="cosine", w_cls=1.0)
    with pytest.raises(ConfigError, match=r"--w_inst 1.0 \(the run has 0.0\)"):  # nor an instance loss it lacked
        check({**saved, "tri_distance": "cosine", "w_cls": 1.0}, clip_weights=moved, tri_distance="cosine",
              w_cls=1.0, w_inst=1.0)


# ------------------------------------------------------------------------------------------------
# 5. Unreadable images: skipped, counted, named; too many stop the run; evaluation accounts for all
# ------------------------------------------------------------------------------------------------
def damage(path: Path, how: str) -> None:
    if how == "zero_byte":
        path.write_bytes(b"")
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    elif how == "bomb":
        path.write_bytes(png_claiming(60000, 60000))


DAMAGE_REASON = {"zero_byte": "zero-byte", "truncated": "truncated", "corrupt": "corrupt",
                 "bomb": "decompression bomb"}


@pytest.fixture(scope="module")
def damaged(bench, tmp_path_factory) -> dict:
    """A copy of the benchmark with 4 of its 48 training images and 2 test images damaged.

    The damaged training files are drawn by the first triplets of epoch 0 (one file per triplet, in
    order), so every one of them is met by a one-epoch run.
    """
    from datasets import TripletDataset, load_benchmark

    root = tmp_path_factory.mktemp("damaged") / "bench"
    shutil.copytree(bench, root)
    split = load_benchmark(root, "sketchy_extend", "test_class_sketchy25", check_canonical=False)
    triplets = TripletDataset(sketches=split.train_sketches, photos=split.train_photos, length=8,
                              image_size=64, seed=0)
    train_bad: dict[str, str] = {}
    for k, (how, key) in enumerate([("zero_byte", "sketch_path"), ("truncated", "positive_path"),
                                    ("bomb", "negative_path"), ("corrupt", "sketch_path")]):
        path = triplets.describe(k)[key]
        assert path not in train_bad, "pick another triplet: this file is already damaged"
        damage(Path(path), how)
        train_bad[path] = how
    query, gallery = str(split.test_sketches[1][0]), str(split.test_photos[2][0])
    damage(Path(query), "zero_byte")
    damage(Path(gallery), "truncated")
    return {"root": root, "train_bad": train_bad, "query": query, "gallery": gallery}


def test_bad_training_images_are_skipped_and_listed_then_evaluation_accounts_for_all(damaged, tmp_path):
    train_files = 2 * 3 * 8
    assert len(damaged["train_bad"]) / train_files < 0.1
    result = train.main(train_args(damaged["root"], tmp_path, "bad", "--epoch", "1", "--datasetLen", "8",
                               "--batch_size", "1", "--max_bad_fraction", "0.5"))
    folder = tmp_path / "bad"
    assert result["global_step"] == 8  # every step ran: each bad triplet was replaced
    lines = (folder / "bad_files.txt").read_text(encoding="utf-8").splitlines()
    named = {path for line in lines for path in damaged["train_bad"] if line.startswith(path)}
    assert named == set(damaged["train_bad"]), lines
    assert all(any(line.startswith(p) for p in damaged["train_bad"]) for line in lines), lines
    for path, how in damaged["train_bad"].items():
        reasons = [line for line in lines if line.startswith(path)]
        assert DAMAGE_REASON[how] in reasons[0], reasons
    assert read_log(folder)[-1]["bad_files_skipped"] == len(lines)
    assert load_checkpoint(folder / "checkpoint.pth")["bad_files"]["failed"] == len(lines)

    report = test_script.main(["--checkpoint", str(folder / "checkpoint.pth"), "--out", str(tmp_path / "eval"),
                               "--num_workers", "0", "--device", "cpu", "--no_progress"])
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["listed"] == {"queries": 8, "gallery": 8} == report["listed"]
    assert saved["num_queries"] == 7 and saved["num_gallery"] == 7
    assert [x["path"] for x in saved["not_evaluated"]["queries"]] == [damaged["query"]]
    assert [x["path"] for x in saved["not_evaluated"]["gallery"]] == [damaged["gallery"]]
    assert "zero-byte" in saved["not_evaluated"]["queries"][0]["reason"]


def test_too_many_bad_training_images_stop_the_run(damaged, tmp_path, caplog):
    # One batch of 200 triplets: ~1 draw in 4 meets a damaged file, far above 5%.
    caplog.clear()
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(damaged["root"], tmp_path, "toomany", "--epoch", "1", "--datasetLen", "200",
                          "--batch_size", "200", "--max_bad_fraction", "0.05"))
    assert exc.value.code == 2
    bad_list = tmp_path / "toomany" / "bad_files.txt"
    assert "--max_bad_fraction 0.05" in caplog.text and str(bad_list) in caplog.text, caplog.text
    lines = bad_list.read_text(encoding="utf-8").splitlines()
    assert lines and all(any(line.startswith(p) for p in damaged["train_bad"]) for line in lines)
    assert not (tmp_path / "toomany" / ".lock").exists()


def test_failed_evaluation_keeps_the_trained_epoch(bench, tmp_path, caplog):
    """Every unseen sketch unreadable: a message naming one (code 2), and the epoch's checkpoint is kept."""
    from datasets import load_benchmark

    root = tmp_path / "bench"
    shutil.copytree(bench, root)
    split = load_benchmark(root, "sketchy_extend", "test_class_sketchy25", check_canonical=False)
    for path, _ in split.test_sketches:  # (path, class) pairs
        damage(Path(path), "zero_byte")
    caplog.clear()
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(root, tmp_path, "noquery", "--epoch", "1", "--datasetLen", "4", "--batch_size", "2"))
    assert exc.value.code == 2
    assert "none of the 8 unseen-class queries could be read" in caplog.text and "zero-byte" in caplog.text
    ckpt = load_checkpoint(tmp_path / "noquery" / "checkpoint.pth")
    assert ckpt["next_epoch"] == 1 and ckpt["global_step"] == 2


# ------------------------------------------------------------------------------------------------
# 6. A non-finite loss stops the run with its step; the last good checkpoint stays
# ------------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(bench, tmp_path, monkeypatch, caplog):
    import losses

    folder = tmp_path / "nan"
    nan_step = 5  # the 2nd step of epoch 1 (3 steps per epoch)
    seen = {"steps": 0}
    real_build = losses.build_criterion

    class NaNAtStep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.triplet = inner.triplet  # the health monitor's distance and margin

        def forward(self, outputs):
            terms = dict(self.inner(outputs))
            seen["steps"] += 1
            if seen["steps"] == nan_step:
                seen["checkpoint"] = sha(folder / "checkpoint.pth")
                terms["loss"] = terms["loss"] * float("nan")
            return terms

    monkeypatch.setattr(losses, "build_criterion", lambda args: NaNAtStep(real_build(args)))
    caplog.clear()
    with pytest.raises(SystemExit) as exc:
        train.main(train_args(bench, tmp_path, "nan", "--epoch", "2", "--datasetLen", "3", "--batch_size", "1"))
    assert exc.value.code == 2
    assert f"non-finite loss at optimizer step {nan_step}" in caplog.text, caplog.text
    assert sha(folder / "checkpoint.pth") == seen["checkpoint"]
    state = load_checkpoint(folder / "checkpoint.pth")
    assert (state["next_epoch"], state["global_step"]) == (1, 3)
    assert torch.isfinite(torch.cat([v.flatten().float() for v in state["model"].values()])).all()
    assert [l["epoch"] for l in read_log(folder)] == [0]
    assert not (folder / ".lock").exists() and temp_files(folder) == []


# ------------------------------------------------------------------------------------------------
# 7. A full disk while saving: the previous checkpoint stays, the message says why, --resume works
# ------------------------------------------------------------------------------------------------
def test_full_disk_keeps_previous_checkpoint(bench, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "full"
    args = train_args(bench, tmp_path, "full", "--epoch", "3", "--datasetLen", "2", "--batch_size", "1",
                  "--eval_every", "10")
    real_save = torch.save

    def save_until_disk_full(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("next_epoch") == 2:  # the 2nd epoch's checkpoint
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    caplog.clear()
    with pytest.raises(SystemExit) as exc:
        train.main(args)
    monkeypatch.undo()
    assert exc.value.code == 2
    assert "disk is full" in caplog.text and str(folder / "checkpoint.pth") in caplog.text, caplog.text
    state = load_checkpoint(folder / "checkpoint.pth")
    assert (state["next_epoch"], state["global_step"]) == (1, 2)
    assert temp_files(folder) == [] and not (folder / ".lock").exists()
    assert [l["epoch"] for l in read_log(folder)] == [0]

    result = train.main(args + ["--resume"])  # space freed: the run continues where the checkpoint is
    assert result["global_step"] == 6
    assert [l["epoch"] for l in read_log(folder)] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# 8. Unicode, spaces and punctuation in paths and class names
# ------------------------------------------------------------------------------------------------
SEEN_NAMES = ["hot-air balloon", "日本の城", "fish, chips & peas"]
UNSEEN_NAMES = ["crème brûlée", 'o\'clock, "12"']  # a comma and quotes: CSV quoting


def test_unicode_spaces_and_punctuation_end_to_end(make_benchmark, tmp_path):
    root = make_benchmark(root=tmp_path / "my data (v2) — ü", seen=SEEN_NAMES, unseen=UNSEEN_NAMES, per_class=8,
                          unseen_per_class=4, images="noise", name="{cls} #{i} (ü)")
    out = root / "results dir"
    exp = "exp ü 1"
    result = train.main(train_args(root, out, exp, "--epoch", "1", "--datasetLen", "4", "--batch_size", "1"))
    assert result["global_step"] == 4
    folder = out / exp
    log_path = tmp_path / "test_py.out"
    proc = spawn(["--exp", exp, "--output_dir", str(out), "--num_workers", "0", "--device", "cpu",
                  "--no_progress"], log_path, script="test.py")
    assert proc.wait(TIMEOUT) == 0, output_of(log_path)
    with open(folder / "per_class.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ["class", "mAP@all"]
    assert [r[0] for r in rows[1:]] == sorted(UNSEEN_NAMES)
    saved = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    # test.py evaluated the model the run evaluated (best.pth, its only epoch), query by query: 4 per class
    assert saved["metrics"]["mAP@all"] == pytest.approx(result["final"]["mAP@all"], abs=1e-6)
    assert sum(float(r[1]) for r in rows[1:]) / len(UNSEEN_NAMES) == pytest.approx(saved["metrics"]["mAP@all"],
                                                                                 abs=1e-4)
    assert saved["split"]["unseen_classes"] == sorted(UNSEEN_NAMES)
    assert saved["num_queries"] == saved["listed"]["queries"] == 8
    assert str(folder / "best.pth") in output_of(log_path)
