"""tools.submit: train.py as a submitit job, on this machine with submitit's local executor (CPU, gloo).

A 2-task job trains one epoch; the same job stopped by the scheduler's signal in the middle of its epoch is
requeued, resumes, and ends with the same log.txt values and weights; a job whose training fails makes --wait
exit with train.py's status. Bad requests and bad train.py flags are refused with exit status 2 before anything is
queued. The requeue hook's limit and the flags of a requeued attempt are checked without a job.
"""

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tools.submit as submit
from conftest import train_args  # tests/ is on sys.path

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TIMEOUT = 300  # seconds a job may take before the test gives up (a 2-task epoch takes ~30 s on 2 busy cores)
# A stuck job ends itself instead of hanging the test: SIGUSR2 after 3.5 minutes (5 minus the 90 s signal delay),
# past the one requeue the preemption test uses, so the job is left stopped and fails.
LIMITS = ("--timeout", "5", "--max_requeues", "1")
# One epoch of 8 steps per task (64 triplets, global batch 8 over 2 tasks), evaluated on the whole unseen split.
SCHEDULE = ("--epoch", "1", "--datasetLen", "64", "--batch_size", "8", "--seed", "5")
COMPARED = ("step", "train_steps", "train_loss", "train_loss_tri", "train_loss_rec", "train_loss_int",
            "train_loss_cls", "train_triplet_acc", "train_emb_spread", "test_mAP@all", "test_P@100")


def job_argv(bench, out, exp, *extra, tasks=2):
    return ["--cluster", "local", "--tasks_per_node", str(tasks), *LIMITS, "--",
            *train_args(bench, out, exp, *SCHEDULE), *extra]


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]


def task_pids(job) -> list[int]:
    """The local job's task processes: the children of submitit's controller process."""
    pid = job._process.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture(scope="module")
def reference(bench, tmp_path_factory):
    """The uninterrupted 2-task job: submitted, waited for (--wait), its folder and exit status."""
    out = tmp_path_factory.mktemp("reference")
    status = submit.main(["--wait", *job_argv(bench, out, "ref")])
    return {"status": status, "folder": out / "ref"}


# ------------------------------------------------------------------------------------------------
# Jobs on this machine
# ------------------------------------------------------------------------------------------------
def test_two_task_job_trains_one_epoch(reference, tmp_path):
    import test as test_script

    folder = reference["folder"]
    assert reference["status"] == 0
    lines = read_log(folder)
    assert len(lines) == 1 and lines[0]["epoch"] == 0
    assert lines[0]["step"] == lines[0]["train_steps"] == 8  # 32 triplets per task in batches of 4
    assert (folder / "checkpoint.pth").is_file() and not (folder / ".lock").exists()
    assert lines[0]["train_loss"] > 0
    # the tasks evaluated their shards of the unseen split and gathered them: what one process (test.py) gets
    report = test_script.main(["--checkpoint", str(folder / "checkpoint.pth"), "--out", str(tmp_path / "eval"),
                               "--num_workers", "0", "--device", "cpu", "--no_progress"])
    assert report["metrics"]["mAP@all"] == pytest.approx(lines[0]["test_mAP@all"], abs=1e-4)
    logs = sorted((folder / "submitit").glob("*_log.out"))
    assert [p.name.split("_")[1] for p in logs] == ["0", "1"], logs  # every task's log, under the job folder
    # the ranks and world size came from submitit's job environment
    assert "distributed: rank 0 of 2 (local rank 0, gloo)" in logs[0].read_text()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the job's tasks in /proc (Linux)")
def test_preempted_job_requeues_and_resumes_exactly(bench, reference, tmp_path):
    out = tmp_path / "results"
    args, train_argv = submit.parse(job_argv(bench, out, "pre"))
    job = submit.submit(args, train_argv)
    folder = out / "pre"
    try:
        deadline = time.monotonic() + TIMEOUT
        # "schedule:" is logged just before the epoch loop; the stop is then taken after its first step.
        while not ((folder / "train.log").is_file() and "schedule:" in (folder / "train.log").read_text()):
            assert job._process.poll() is None, job.stdout()
            assert time.monotonic() < deadline, "the job never started training"
            time.sleep(0.05)
        # SIGUSR2 to every task: what SLURM sends on preemption (`scancel --signal USR2`, SlurmJob._interrupt)
        # and submitit's local controller at its time limit. (LocalJob._interrupt signals the controller itself,
        # which has no handler for it and dies, orphaning the tasks.)
        for pid in task_pids(job):
            os.kill(pid, signal.SIGUSR2)
        assert submit.wait(job) == 0
    finally:
        if job._process.poll() is None:
            job.cancel()
    train_log = (folder / "train.log").read_text()
    assert "stopped by SIGUSR2 during epoch 0 at step" in train_log, train_log  # inside the epoch, not after it
    assert "resumed from epoch 0 (after" in train_log and "requeued (1 of at most 1)" in job.stdout()
    # the same run as the one never interrupted: same steps, same values, same weights
    resumed, uninterrupted = read_log(folder), read_log(reference["folder"])
    assert len(resumed) == len(uninterrupted) == 1
    for key in COMPARED:
        assert resumed[0][key] == pytest.approx(uninterrupted[0][key], rel=1e-6, abs=1e-9), key
    a = torch.load(folder / "checkpoint.pth", weights_only=True)
    b = torch.load(reference["folder"] / "checkpoint.pth", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_wait_exits_with_the_status_of_a_failing_job(bench, tmp_path, capsys):
    """The flags pass every check before submission, but the training refuses the mask cache at its start."""
    cache = tmp_path / "masks.pt"
    cache.write_text("not a mask cache")
    status = submit.main(["--wait", *job_argv(bench, tmp_path, "bad", "--vxl_cache", str(cache), "--augment", "none",
                                         tasks=1)])
    assert status == 2
    text = capsys.readouterr().out
    assert "train.py exited with status 2" in text and "masks.pt" in text, text


# ------------------------------------------------------------------------------------------------
# Bad requests: a message and exit status 2, nothing queued
# ------------------------------------------------------------------------------------------------
def refused(argv, capsys, tmp_path) -> str:
    """Run tools.submit; it must exit 2 and leave tmp_path as it was (no job folder, no experiment)."""
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        submit.main([str(a) for a in argv])
    assert exc.value.code == 2
    assert sorted(tmp_path.rglob("*")) == before, "something was written"
    captured = capsys.readouterr()
    return captured.err + captured.out


@pytest.mark.parametrize("argv, message", [
    (["--cluster", "pbs"], "invalid choice: 'pbs'"),
    (["--cluster", "slurm", "--nodes", "2", "--ngpus", "0"], "without GPUs"),
    (["--cluster", "slurm", "--ngpus", "2", "--tasks_per_node", "1"], "one task per GPU"),
    (["--cluster", "local", "--nodes", "2"], "needs --cluster slurm"),
    (["--cluster", "debug", "--tasks_per_node", "2"], "one task in this process"),
    (["--cluster", "local", "--timeout", "2"], "use --timeout 3 or more"),
    (["--cluster", "local", "--timeout", "3", "--signal_delay", "150"], "use --timeout 4 or more"),
])
def test_bad_requests_are_refused(argv, message, capsys, tmp_path):
    text = refused([*argv, "--", "--output_dir", tmp_path, "--exp", "x"], capsys, tmp_path)
    assert message in text, text


def test_gpus_this_machine_lacks_are_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    text = refused(["--cluster", "local", "--ngpus", "1", "--", "--output_dir", tmp_path], capsys, tmp_path)
    assert "--ngpus 1: this machine has 0 GPU(s)" in text


def fake_slurm(tmp_path, monkeypatch, sbatch: str) -> Path:
    """``srun`` and an ``sbatch`` running ``sbatch`` (shell) on PATH: the SLURM submission path, offline."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", sbatch)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_slurm_job_asks_for_one_task_per_gpu_and_the_stop_signal(monkeypatch, tmp_path):
    script = tmp_path / "script.sh"
    fake_slurm(tmp_path, monkeypatch, f'cp "$1" {script}\necho "Submitted batch job 4242"')
    status = submit.main(["--nodes", "2", "--ngpus", "8", "--partition", "gpu", "--timeout", "60", "--mem_gb", "64",
                          "--cpus_per_task", "10", "--", "--output_dir", str(tmp_path), "--exp", "x",
                          "--batch_size", "16"])
    assert status == 0
    text = script.read_text()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=60",
                 "--mem=64GB", "--cpus-per-task=10", "--signal=USR2@90", "--requeue", "--job-name=puxim-x"):
        assert f"#SBATCH {line}\n" in text, line
    assert "srun " in text and "--kill-on-bad-exit=1" in text
    job = submit.submitit.SlurmJob(tmp_path / "x" / "submitit", "4242")
    assert job.submission().function.argv[-4:] == ["--exp", "x", "--batch_size", "16"]  # what the tasks run


def test_what_sbatch_refuses_is_reported(monkeypatch, capsys, tmp_path):
    fake_slurm(tmp_path, monkeypatch, 'echo "sbatch: error: invalid partition specified: nope" >&2\nexit 1')
    with pytest.raises(SystemExit) as exc:
        submit.main(["--partition", "nope", "--", "--output_dir", str(tmp_path), "--exp", "x"])
    assert exc.value.code == 2
    assert "sbatch refused the job: sbatch: error: invalid partition specified: nope" in capsys.readouterr().err


def test_slurm_without_slurm_is_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(submit.submitit.SlurmExecutor, "affinity", classmethod(lambda cls: -1))
    text = refused(["--cluster", "slurm", "--", "--output_dir", tmp_path], capsys, tmp_path)
    assert "no SLURM here" in text and "--cluster local" in text


@pytest.mark.parametrize("flags, message", [
    (["--epoch", "zero"], "argument --epoch: invalid int value"),  # train.py's parser
    (["--epoch", "0"], "--epoch must be positive"),  # utils.config.validate
    (["--exp", "../up"], "plain folder name"),
    (["--batch_size", "9"], "not divisible by the job's 2 tasks"),
    (["--device", "cuda"], "--device cuda in train.py's flags, but the job asks for no GPUs"),
    (["--amp", "bf16"], "--amp bf16 in train.py's flags, but the job asks for no GPUs"),
    (["--vxl_cache", "/no/such/masks.pt", "--augment", "none"], "--vxl_cache /no/such/masks.pt: no such file"),
    (["--vxl_cache", "/no/such/masks.pt"], "--vxl_cache /no/such/masks.pt holds VxL masks of whole photos"),
])
def test_train_flags_train_py_would_refuse_are_refused(bench, flags, message, capsys, tmp_path):
    argv = ["--cluster", "local", "--tasks_per_node", "2", "--", *train_args(bench, tmp_path, "x"), *flags]
    assert message in refused(argv, capsys, tmp_path)


def test_existing_experiments_follow_train_py_rules(bench, capsys, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "log.txt").write_text("{}\n")
    base = ["--cluster", "local", "--", *train_args(bench, tmp_path, "run")]
    assert "stopped before its first checkpoint" in refused(base, capsys, tmp_path)
    assert "--resume: no checkpoint at" in refused([*base, "--resume"], capsys, tmp_path)
    (folder / "checkpoint.pth").write_bytes(b"")
    assert "already holds a run. Use --resume" in refused(base, capsys, tmp_path)


def test_resume_of_an_experiment_another_job_is_running_is_refused(bench, capsys, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "checkpoint.pth").write_bytes(b"")
    (folder / ".lock").write_text("gpu-node-042 4242\n")  # train.py's RunLock, held by a job on a compute node
    text = refused(["--cluster", "local", "--", *train_args(bench, tmp_path, "run"), "--resume"], capsys, tmp_path)
    assert "process 4242 on host gpu-node-042 is training this experiment" in text


# ------------------------------------------------------------------------------------------------
# The requeue hook and a requeued attempt's flags, without a job
# ------------------------------------------------------------------------------------------------
def test_checkpoint_requeues_until_the_limit(tmp_path):
    job = submit.TrainingJob(["--exp", "e"], output_dir=tmp_path, max_requeues=2, requeues=1)
    again = job.checkpoint()
    assert again.function.requeues == 2 and again.function.argv == ["--exp", "e"]
    assert again.function.checkpoint() is None  # the limit reached: submitit leaves the job stopped


def test_requeued_attempt_resumes(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    first = submit.TrainingJob(["--exp", "e", "--overwrite"], output_dir=tmp_path, max_requeues=3)
    assert first.attempt_argv() == ["--exp", "e", "--overwrite"]
    requeued = submit.TrainingJob(first.argv, output_dir=tmp_path, max_requeues=3, requeues=1)
    (tmp_path / "args.json").write_text("{}")  # stopped before its first checkpoint: started again
    assert requeued.attempt_argv()[-1] == "--overwrite"
    (tmp_path / "checkpoint.pth").write_bytes(b"")  # --resume wins over the submitted --overwrite
    assert requeued.attempt_argv()[-1] == "--resume"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # SLURM's own requeue (a node failure) of the first attempt
    assert first.attempt_argv()[-1] == "--resume"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "4")
    with pytest.raises(submit.JobExit, match="more than --max_requeues 3"):
        first.attempt_argv()


def test_a_requeued_job_takes_back_its_own_lock_only(tmp_path):
    out, jobs = tmp_path / "run", tmp_path / "submitit"
    out.mkdir()
    env = SimpleNamespace(job_id="77", paths=SimpleNamespace(folder=jobs))
    job = submit.TrainingJob([], output_dir=out, max_requeues=1)
    job.take_back_lock(env)  # the first attempt notes the lock it will hold
    note = (jobs / "77_lock_owner").read_text()
    (out / ".lock").write_text(note)  # killed holding it
    job.take_back_lock(env)
    assert not (out / ".lock").exists()
    (out / ".lock").write_text("other-node 99\n")  # another run's
    job.take_back_lock(env)
    assert (out / ".lock").read_text() == "other-node 99\n"
