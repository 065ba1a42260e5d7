"""Launch train.py as a cluster job through submitit: one task per GPU, requeued on preemption and timeout.

    python -m tools.submit --ngpus 4 --partition gpu --timeout 1440 -- --exp sketchy25 --data_path ROOT ...
    python -m tools.submit --nodes 2 --ngpus 8 --partition gpu -- --exp sketchy25 --data_path ROOT ...
    python -m tools.submit --cluster local --tasks_per_node 2 --wait -- --exp try   # this machine (CPU: gloo)
    python -m tools.submit --cluster debug -- --exp try                             # in this process

Everything after ``--`` is train.py's command line. It is parsed and checked here first, with train.py's own
parser and configuration (``utils.config``) and the experiment folder's rules, so that no job waits in the queue only to fail
on a typo. Each task takes its rank, the world size and the master address and port from the job
(``submitit.helpers.TorchDistributedEnvironment``) and runs ``train.main(argv)``. submitit's files (the job
script, the pickled job, one stdout/stderr pair per task) go to ``--folder``, by default
``OUTPUT_DIR/EXP/submitit/`` (named by job id); the run's own files to ``OUTPUT_DIR/EXP/`` as with train.py.

Preemption and time limit: SLURM sends the job SIGUSR2 (``--signal_delay`` seconds before the limit, and on a
preemption where the cluster is set to). Every task then asks its training to stop after the current step
(``StopFlag.request``, SIGTERM's path), the run saves ``checkpoint.pth`` and ends, and rank 0 hands over
to submitit, whose handler calls :meth:`TrainingJob.checkpoint`: the job is requeued with ``--resume``, the
same run step for step, at most ``--max_requeues`` times.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import socket
import sys
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError, UncompletedJobError

from tools import ToolError, run_tool

log = logging.getLogger("tools.submit")

CLUSTERS = ("slurm", "local", "debug")  # local: this machine, in the background; debug: this process
DEFAULT_TIMEOUT_MIN = 1440
# submitit's own default for SLURM: the time a job has, between the stop signal and the kill, to finish its
# step, save checkpoint.pth and requeue (raise it when an epoch's evaluation or the checkpoint write is longer).
DEFAULT_SIGNAL_DELAY_S = 90
# The time a job must have before its stop signal, to start (imports, data, model, --resume) and train a step:
# a job that never gets that far would be requeued without progress.
MIN_START_S = 60
DEFAULT_MAX_REQUEUES = 10
JOB_EXIT = re.compile(r"train\.py exited with status (-?\d+)")  # in the failed task's traceback (see JobExit)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m tools.submit", usage="python -m tools.submit [options] -- [train.py flags]",
                                description="Run train.py as a SLURM job (or on this machine) through submitit; "
                                            "flags after -- are train.py's.")
    p.add_argument("--cluster", default="slurm", choices=CLUSTERS,
                   help="slurm: submit with sbatch; local: the same job on this machine, in the background; "
                        "debug: in this process, pdb on an exception (default: %(default)s)")
    p.add_argument("--nodes", type=int, default=1, help="machines (slurm only; default: %(default)s)")
    p.add_argument("--ngpus", type=int, default=None, help="GPUs per node, one task each (default: 1 on slurm, "
                                                           "0 on local and debug)")
    p.add_argument("--tasks_per_node", type=int, default=None,
                   help="processes per node (default: --ngpus, or 1 without GPUs); with GPUs, one per GPU")
    p.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_MIN,
                   help="time limit of one attempt, in minutes; at it the job saves and is requeued. At least "
                        f"(--signal_delay + {MIN_START_S} s), in whole minutes: 3 with the default delay "
                        "(default: %(default)s)")
    p.add_argument("--signal_delay", type=int, default=DEFAULT_SIGNAL_DELAY_S,
                   help="seconds before the time limit at which the job is told to stop and save (default: "
                        "%(default)s, submitit's)")
    p.add_argument("--mem_gb", type=int, default=None, help="memory per node in GB (default: the cluster's)")
    p.add_argument("--cpus_per_task", type=int, default=None,
                   help="CPU cores per task (default: the cluster's); train.py's --num_workers loaders use them")
    p.add_argument("--max_requeues", type=int, default=DEFAULT_MAX_REQUEUES,
                   help="requeues after a preemption or timeout, all counted, before the job is left stopped "
                        "(its checkpoint kept for --resume; default: %(default)s)")
    p.add_argument("--folder", default=None,
                   help="submitit's folder: job script, pickles, each task's stdout/stderr, named by job id "
                        "(%%j in it: a folder per job; default: OUTPUT_DIR/EXP/submitit)")
    p.add_argument("--wait", action="store_true", help="block until the job ends and exit with its status")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``(this tool's flags, train.py's argv)``: train.py's start after the first ``--``."""
    cut = argv.index("--") if "--" in argv else len(argv)
    return get_args_parser().parse_args(argv[:cut]), list(argv[cut + 1:])


def main(argv=None) -> int:
    """Submit (and with --wait, wait): 0, or the job's status. A bad request or bad train.py flags: a message
    and exit status 2, with nothing queued (``tools.run_tool``)."""
    args, train_argv = parse(list(sys.argv[1:] if argv is None else argv))
    return run_tool("tools.submit", lambda a: run(a, train_argv), args)


def run(args, train_argv: list[str]) -> int:
    job = submit(args, train_argv)
    if args.wait or args.cluster == "debug":  # a debug job runs only when its result is asked for
        return wait(job)
    return 0


# ----------------------------------------------------------------------------- checks, before anything is queued
def resolve_request(args) -> None:
    """Fill the per-cluster defaults; refuse a request no job could run (ToolError)."""
    if args.ngpus is None:
        args.ngpus = 1 if args.cluster == "slurm" else 0
    if args.tasks_per_node is None:
        args.tasks_per_node = args.ngpus or 1
    for name in ("nodes", "tasks_per_node", "timeout", "signal_delay"):
        if getattr(args, name) < 1:
            raise ToolError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.ngpus < 0 or args.max_requeues < 0:
        raise ToolError("--ngpus and --max_requeues must be >= 0")
    if args.ngpus and args.tasks_per_node != args.ngpus:  # DDP: one process per GPU, LOCAL_RANK picks it
        raise ToolError(f"--tasks_per_node {args.tasks_per_node} with --ngpus {args.ngpus}: training runs one task "
                        f"per GPU; leave --tasks_per_node out (it follows --ngpus).")
    minimum = min_timeout(args.signal_delay)
    if args.timeout < minimum:
        raise ToolError(f"--timeout {args.timeout} min is too short to save a checkpoint and requeue: the job is told "
                        f"to stop {args.signal_delay} s (--signal_delay) before its limit and needs {MIN_START_S} s "
                        f"before that to start and train; use --timeout {minimum} or more.")
    if args.cluster == "slurm":
        _check_slurm(args)
    else:
        _check_this_machine(args)


def min_timeout(signal_delay: int) -> int:
    """The shortest --timeout (minutes) that leaves a job time to start and train before its stop signal."""
    return math.ceil((signal_delay + MIN_START_S) / 60)


def _check_slurm(args) -> None:
    if args.nodes > 1 and args.ngpus == 0:  # CPU processes talking gloo over the network: no use
        raise ToolError(f"--nodes {args.nodes} without GPUs: several machines only pay off with GPUs (NCCL); ask "
                        f"for them with --ngpus N, or train on one node.")
    if submitit.SlurmExecutor.affinity() <= 0:
        raise ToolError("--cluster slurm: no SLURM here (`srun` is not on PATH). Submit from the cluster's login "
                        "node, or run on this machine with --cluster local.")


def _check_this_machine(args) -> None:
    import torch

    if args.nodes > 1:
        raise ToolError(f"--cluster {args.cluster} runs on this machine: --nodes {args.nodes} needs --cluster slurm.")
    if args.cluster == "debug" and args.tasks_per_node > 1:
        raise ToolError("--cluster debug runs one task in this process; --cluster local runs several.")
    have = torch.cuda.device_count()
    if args.ngpus > have:
        raise ToolError(f"--ngpus {args.ngpus}: this machine has {have} GPU(s); use --ngpus {have} "
                        f"(--tasks_per_node N for N CPU processes).")
    ignored = [f"--{k}" for k in ("partition", "mem_gb", "cpus_per_task") if getattr(args, k) is not None]
    if ignored:
        log.warning("%s: SLURM settings, ignored by --cluster %s", ", ".join(ignored), args.cluster)


def check_training(args, train_argv: list[str]):
    """train.py's configuration (``utils.config.RunConfig``) for its flags, read by train.py's own parser, then what
    a task would refuse only at its start on the cluster: the experiment folder (exists, --resume, another run's
    lock), the global batch against the job's tasks, devices, input paths and the starting weights. Nothing is
    written."""
    import train
    from utils.config import parse_config
    from utils.experiment import ExperimentError, check_output_dir

    parsed = train.get_args_parser().parse_args(train_argv)  # a bad flag: argparse's message and exit 2
    try:
        config = parse_config(parsed)
        runtime = config.runtime
        check_output_dir(Path(runtime.output_dir) / runtime.exp, resume=runtime.resume, overwrite=runtime.overwrite)
    except ExperimentError as e:  # (a ConfigError goes to run_tool as it is)
        raise ToolError(str(e)) from None
    world = args.nodes * args.tasks_per_node
    if config.optim.batch_size % world:
        raise ToolError(f"--batch_size {config.optim.batch_size} (the global batch) is not divisible by the job's "
                        f"{world} tasks ({args.nodes} node(s) x {args.tasks_per_node}): use a multiple of {world}.")
    gpu_only = [f for f, on in (("--device cuda", runtime.device == "cuda"),
                                (f"--amp {runtime.amp}", runtime.amp in ("bf16", "fp16"))) if on]
    if args.ngpus == 0 and gpu_only:
        raise ToolError(f"{' and '.join(gpu_only)} in train.py's flags, but the job asks for no GPUs: add --ngpus N.")
    if args.ngpus and runtime.device == "cpu":
        raise ToolError(f"--device cpu with --ngpus {args.ngpus}: the GPUs would sit idle; drop one of them.")
    missing = _missing_inputs(config)
    if missing:
        flag, path = missing[0]
        raise ToolError(f"--{flag} {path}: no such file or folder here (the job's tasks would read the same path).")
    if not runtime.resume:  # as train.py: a resumed run's weights come from its checkpoint
        from models import check_starting_weights

        check_starting_weights(config)  # a --vit_weights that does not fit: refused here, not after the queue
    return config


def _missing_inputs(config) -> list[tuple[str, str]]:
    from utils.config import is_timm_tag

    model = config.model
    wanted = [("data_path", config.data.data_path), ("vxl_cache", model.vxl_cache)]
    if model.clip_weights and model.clip_weights != "openai":
        wanted.append(("clip_weights", model.clip_weights))
    if model.vit_weights and not is_timm_tag(model.vit_weights):
        wanted.append(("vit_weights", model.vit_weights))
    return [(flag, path) for flag, path in wanted if path and not Path(path).expanduser().exists()]


# ----------------------------------------------------------------------------- submission and waiting
def submit(args, train_argv: list[str]) -> submitit.Job:
    """Check everything, then queue the job; returns submitit's handle on it."""
    resolve_request(args)
    runtime = check_training(args, train_argv).runtime
    output_dir = Path(runtime.output_dir).absolute() / runtime.exp
    folder = Path(args.folder) if args.folder else output_dir / "submitit"
    executor = make_executor(args, folder, name=f"puxim-{runtime.exp}")
    task = TrainingJob(train_argv, output_dir=output_dir, max_requeues=args.max_requeues)
    try:
        with submitit.helpers.clean_env():  # submitted from inside another job: not that job's ranks and ids
            job = executor.submit(task)
    except (FailedJobError, FailedSubmissionError) as e:  # sbatch said no: a partition, a limit, an account
        raise ToolError(f"sbatch refused the job: {str(e).strip()}") from None
    tell(job, args, output_dir)
    return job


def make_executor(args, folder: Path, *, name: str) -> submitit.Executor:
    if args.cluster == "debug":
        return submitit.DebugExecutor(folder)
    if args.cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(timeout_min=args.timeout, tasks_per_node=args.tasks_per_node,
                                   gpus_per_node=args.ngpus, signal_delay_s=args.signal_delay)
        return executor
    # submitit counts timeouts itself (max_num_timeout); --max_requeues, counted in TrainingJob, binds first.
    executor = submitit.SlurmExecutor(folder, max_num_timeout=args.max_requeues)
    wanted = dict(job_name=name, time=args.timeout, nodes=args.nodes, ntasks_per_node=args.tasks_per_node,
                  gpus_per_node=args.ngpus or None, cpus_per_task=args.cpus_per_task, partition=args.partition,
                  mem=f"{args.mem_gb}GB" if args.mem_gb else None, signal_delay_s=args.signal_delay,
                  # a task that fails ends the others, which would wait for it in their next collective
                  srun_args=["--kill-on-bad-exit=1"],
                  # requeue-eligible where the cluster's default (JobRequeue) is not: scontrol requeue, and
                  # SLURM's own requeue after a node failure (attempt_argv then resumes)
                  additional_parameters={"requeue": True})
    executor.update_parameters(**{k: v for k, v in wanted.items() if v is not None})
    return executor


def tell(job, args, output_dir: Path) -> None:
    """Where the job's files are, and how to follow and cancel it."""
    log.info("submitted job %s (--cluster %s, %d node(s) x %d task(s), %d GPU(s) per node)", job.job_id,
             args.cluster, args.nodes, args.tasks_per_node, args.ngpus)
    log.info("run folder: %s; task logs: %s (one .out/.err pair per task)", output_dir,
             job.paths.stdout.parent)
    if args.cluster == "slurm":
        log.info("follow: squeue -j %s, tail -f %s; cancel: scancel %s", job.job_id, job.paths.stdout, job.job_id)
    elif args.cluster == "local":
        log.info("follow: tail -f %s; stop: kill -TERM %s (each task saves a checkpoint after its step)",
                 job.paths.stdout, job.job_id)


def wait(job) -> int:
    """Block until ``job`` ends: 0 when it finished, else the exit status train.py gave (1 when none)."""
    try:
        job.results()
    except SystemExit as e:  # --cluster debug: train.py's own exit, in this process
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except KeyboardInterrupt:  # a SLURM job goes on; a local one's tasks got the Ctrl-C too: they save and stop
        log.warning("stopped waiting for job %s%s", job.job_id, "" if isinstance(job, submitit.LocalJob) else
                    f", which goes on (scancel {job.job_id} ends it)")
        return 130
    except (FailedJobError, UncompletedJobError) as e:
        found = JOB_EXIT.search(str(e))
        lines = [line for line in str(e).splitlines() if line.strip() and not line.startswith("-")]
        why = next((line for line in reversed(lines) if "Error" in line or "exited" in line),
                   lines[-1] if lines else "")
        log.error("job %s failed: %s\n  logs: %s", job.job_id, why.strip(), job.paths.stdout.parent)
        return int(found.group(1)) if found else 1
    log.info("job %s finished", job.job_id)
    return 0


# ----------------------------------------------------------------------------- the job
class JobExit(RuntimeError):
    """train.py ended a task with a non-zero status; submitit keeps only the traceback's text, so the status is
    in the message (JOB_EXIT reads it back for --wait)."""

    def __init__(self, code: int, hint: str):
        super().__init__(f"train.py exited with status {code}: {hint}")
        self.code = code


class LastError(logging.Handler):
    """Keeps the last ERROR message logged: train.py's reason for its exit status 2, for JobExit."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.message = None

    def emit(self, record) -> None:
        self.message = record.getMessage()


def stop_signal() -> signal.Signals:
    """The signal submitit has SLURM send before the time limit and on preemption (SIGUSR2, or
    $SUBMITIT_PREEMPT_SIGNAL)."""
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


class TrainingJob(submitit.helpers.Checkpointable):
    """What every task runs: ``train.main(argv)`` in the job's torch.distributed environment.

    submitit pickles it into the job folder; the one :meth:`checkpoint` returns replaces it there, and is
    what a requeued job runs (``requeues`` counted once more)."""

    def __init__(self, argv: list[str], *, output_dir, max_requeues: int, requeues: int = 0):
        self.argv = [str(a) for a in argv]
        self.output_dir = str(output_dir)
        self.max_requeues = max_requeues
        self.requeues = requeues
        self.stopped_by = None  # the scheduler's signal, in a running task

    def __call__(self):
        import train
        from utils.logger import setup_logging
        from utils.signals import StopFlag

        env = submitit.JobEnvironment()
        # set_cuda_visible_devices=False: each task sees the node's GPUs and train.py takes LOCAL_RANK's.
        # overwrite: a RANK or MASTER_PORT exported by sbatch from the submitting shell is not this job's.
        dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        setup_logging(rank=dist.rank)
        logging.getLogger("submitit").propagate = False  # it has its own handler: each line once in the log
        argv = self.attempt_argv()
        debug = env.cluster == "debug"  # in the caller's process: no signals, no requeue
        if dist.rank == 0 and not debug:
            self.take_back_lock(env)
        sig = stop_signal()
        # submitit's process_job installed its handler (checkpoint, requeue, exit): it runs later, in after_exit,
        # once the training has stopped and saved
        submitit_handler = None if debug else signal.signal(sig, self.on_stop_signal)
        requeue = (lambda: submitit_handler(sig, None)) if callable(submitit_handler) else None
        errors = LastError()
        logging.getLogger().addHandler(errors)
        try:
            return train.main(argv)
        except SystemExit as stop:
            return self.after_exit(stop, rank=dist.rank, debug=debug, requeue=requeue, error=errors.message)
        finally:
            logging.getLogger().removeHandler(errors)
            StopFlag.requested = None  # a request that came after the run ended goes no further
            if submitit_handler is not None:
                signal.signal(sig, submitit_handler)

    def on_stop_signal(self, signum, frame) -> None:
        """The scheduler's stop signal: only ask the training to stop after its step (it saves, then ends). The
        requeue follows in after_exit: waiting for the checkpoint here would block the step that writes it."""
        from utils.signals import StopFlag

        self.stopped_by = signal.Signals(signum).name
        StopFlag.request(self.stopped_by)

    def after_exit(self, stop: SystemExit, *, rank: int, debug: bool, requeue, error: str | None = None):
        """train.main ended with ``stop``: requeue after the scheduler's signal (rank 0; the other ranks just end),
        else fail the task with train.py's status and its last error message."""
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        if code == 0:
            return None
        if self.stopped_by and code in (130, 143):  # stopped and saved, as the signal asked
            if rank != 0:
                log.warning("rank %d stopped after %s; rank 0 requeues the job", rank, self.stopped_by)
                return {"stopped_by": self.stopped_by}
            if requeue is not None:
                requeue()  # submitit: checkpoint(), then requeue and exit; an error when not requeued
        if debug:  # in the caller's process: its own exit status, not a traceback
            raise stop
        if code in (130, 143):
            hint = ("stopped by a signal (scancel, or a preemption the cluster does not announce with the requeue "
                    f"signal); its checkpoint is in {self.output_dir}: submit again with --resume to continue")
        else:
            hint = error or "the reason is in the task's log"
        raise JobExit(code, hint) from None

    def checkpoint(self, *args, **kwargs):
        """submitit's requeue hook. On rank 0 it is called once the training, asked to stop by the signal
        (on_stop_signal), has saved ``checkpoint.pth`` and ended: this job, counted once more, to run again and
        resume from it (attempt_argv); None, left stopped, once --max_requeues is spent."""
        checkpoint = Path(self.output_dir) / "checkpoint.pth"
        if self.requeues >= self.max_requeues:
            log.error("not requeued: the job was requeued %d time(s) already (--max_requeues %d); %s continues with "
                      "train.py's --resume", self.requeues, self.max_requeues, checkpoint)
            return None
        log.warning("requeued (%d of at most %d) after %s; the next attempt resumes from %s", self.requeues + 1,
                    self.max_requeues, self.stopped_by or "the scheduler's signal",
                    checkpoint if checkpoint.is_file() else "the start (no checkpoint yet)")
        return submitit.helpers.DelayedSubmission(
            TrainingJob(self.argv, output_dir=self.output_dir, max_requeues=self.max_requeues,
                        requeues=self.requeues + 1))

    def attempt_argv(self) -> list[str]:
        """train.py's flags for this attempt: the submitted ones; after a requeue (ours, or SLURM's own after a node
        failure) ``--resume`` once the run has a checkpoint (it wins over a submitted --overwrite, which would
        wipe the job's own progress), else ``--overwrite`` of the attempt that saved none."""
        restarts = max(self.requeues, int(os.environ.get("SLURM_RESTART_COUNT") or 0))  # SLURM counts ours too
        if restarts == 0:
            return self.argv
        if restarts > self.max_requeues:
            raise JobExit(2, f"the job was restarted {restarts} times, more than --max_requeues {self.max_requeues}")
        folder = Path(self.output_dir)
        if (folder / "checkpoint.pth").is_file():
            return self.argv + ["--resume"]
        if any((folder / name).exists() for name in ("args.json", "log.txt")):
            return self.argv + ["--overwrite"]
        return self.argv

    def take_back_lock(self, env) -> None:
        """An earlier attempt of this job, killed (time limit, node failure), may have left the run's lock, naming
        another node: it is this job's own, and removed. The lock this attempt will hold is noted for the next.
        Any other lock is left for train.py to refuse."""
        from utils.experiment import LOCK_NAME

        note = env.paths.folder / f"{env.job_id}_lock_owner"
        lock = Path(self.output_dir) / LOCK_NAME
        try:
            if lock.read_text() == note.read_text():
                log.warning("removing %s, left by an earlier attempt of this job (%s)", lock, note.read_text().strip())
                lock.unlink()
        except OSError:  # no lock, or no earlier attempt
            pass
        note.parent.mkdir(parents=True, exist_ok=True)
        # the line utils.experiment.RunLock will write: train.main runs in this process
        note.write_text(f"{socket.gethostname()} {os.getpid()}\n")


if __name__ == "__main__":
    import importlib

    # this module again, by its name: submitit then pickles TrainingJob by reference, not as __main__'s code
    raise SystemExit(importlib.import_module("tools.submit").main())
