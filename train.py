"""Train PuXIM for zero-shot sketch-based image retrieval.

    python train.py --exp NAME [--data_path ROOT --dataset sketchy_extend --test_class test_class_sketchy25]
    python train.py --config configs/sketchy25.yaml --data_path ROOT --exp NAME     # a recipe file
    python train.py --config results/OLD/args.json --exp NAME                       # an earlier run again
    torchrun --nproc_per_node=4 train.py --exp NAME ...                             # several GPUs (DDP)

Every setting is declared once in ``utils/config.py``; ``--arch`` picks a preset (``utils/presets.py``). Without
``--data_path`` it trains the ``tiny`` preset on the built-in synthetic benchmark (CPU-friendly). Everything
lands in ``results/NAME/``: args.json (the resolved configuration), train.log, log.txt (one JSON line per
epoch), tb/ (TensorBoard), checkpoint.pth (latest, atomic), best.pth (best unseen-class mAP@all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import engine
from datasets import check_data_root
from datasets.loaders import build_loaders
from models import compile_model, ln_eps_mismatch
from utils import distributed as dist_utils
from utils.checkpoint import CheckpointError
from utils.config import RunConfig, add_config_flags, parse_config
from utils.experiment import ExperimentError, RunLock, discard_overwritten, prepare_output_dir, write_args_json
from utils.logger import ExperimentLogger, TrainingPictures, setup_logging
from utils.metrics import final_summary
from utils.runtime import UserError, run_cli, select_amp, select_device
from utils.schedule import log_schedule
from utils.signals import StopFlag
from utils.train_state import TrainState

log = logging.getLogger("train")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("PuXIM training", add_help=True)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML or JSON configuration (configs/, or an earlier run's args.json); flags given here win")
    add_config_flags(p)
    return p


def user_errors() -> tuple:
    """What train.py reports as a message and exit status 2, not as a traceback."""
    from datasets.filelist import DatasetError  # bad data
    from datasets.mask_cache import MaskCacheError
    from models.encoder import WeightLoadError

    return (UserError, ExperimentError, CheckpointError, engine.NonFiniteLossError, DatasetError, MaskCacheError,
            WeightLoadError)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    setup_logging(rank=int(os.environ.get("RANK", "0")))
    return run_cli(run, args, user_errors=user_errors, report=log)


@dataclass
class Run:
    """Where and on what this process trains."""

    config: RunConfig
    output_dir: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int
    world: int
    stop: StopFlag

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def run(args: argparse.Namespace) -> dict:
    config = parse_config(args)
    output_dir = Path(config.runtime.output_dir) / config.runtime.exp
    device = select_device(config.runtime)
    rank, world, _ = dist_utils.init_distributed(device.type)
    dist_utils.check_global_batch(config.optim.batch_size, world)  # before anything is built or written
    if rank == 0:
        check_data_root(config.data)  # a mistyped --data_path stops the run before its folder is made
        prepare_output_dir(output_dir, resume=config.runtime.resume, overwrite=config.runtime.overwrite)
    dist_utils.barrier()
    setup_logging(output_dir if rank == 0 else None, rank=rank)
    lock = RunLock(output_dir).acquire() if rank == 0 else None
    try:
        with StopFlag.installed() as stop:
            amp_dtype = select_amp(config.runtime, device)
            return train(Run(config, output_dir, device, amp_dtype, rank, world, stop))
    finally:
        if lock is not None:
            lock.release()
        dist_utils.cleanup()


def train(run: Run) -> dict:
    """Build, restore (--resume), then train and evaluate epoch by epoch with a checkpoint after each."""
    announce(run)
    torch.manual_seed(run.config.runtime.seed + run.rank)  # before anything is built: the weights and dropout
    data, state, criterion = build(run)
    run.config = state.config  # with the seen-class count the data gave
    if run.config.runtime.resume:
        state.restore(run.output_dir / "checkpoint.pth")  # refused when the run-defining settings differ
        if state.next_epoch >= run.config.optim.epoch:
            log.warning("the run has already trained its %d epochs: nothing to do. Pass a larger --epoch to "
                        "train longer.", state.next_epoch)
    if run.is_main:
        write_args_json(run.output_dir, run.config.to_dict())
    ddp_model = prepare_model(state, run)
    loaders = build_loaders(data, run.config, rank=run.rank, world=run.world, device=run.device)
    if run.is_main:
        log_schedule(run.config, len(data["train"]), run.world)
    resumed_at = state.global_step if run.config.runtime.resume else None
    exp_logger = ExperimentLogger(run.output_dir, enabled=run.is_main, purge_step=resumed_at)
    state.health.exp_logger = exp_logger
    loop = engine.TrainLoop(
        model=ddp_model, criterion=criterion, optimizer=state.optimizer, device=run.device, amp_dtype=run.amp_dtype,
        scaler=state.scaler, exp_logger=exp_logger, log_every=run.config.runtime.log_every, should_stop=run.stop,
        bad_file_log=state.bad_files, progress=run.is_main and not run.config.runtime.no_progress, health=state.health,
        lr_at=engine.linear_warmup(run.config.optim.lr, run.config.optim.warmup_steps))
    pictures = TrainingPictures(data, seed=run.config.runtime.seed, image_size=run.config.data.image_size)
    t = Training(state, loop, loaders, class_names=sorted(data["class_to_idx"], key=data["class_to_idx"].get),
                 pictures=pictures if run.is_main and not run.config.runtime.no_tb_images else None)
    metrics: dict = {}
    for epoch in range(state.next_epoch, run.config.optim.epoch):
        result = train_epoch(run, t, epoch)  # an interrupted epoch saves a checkpoint and ends the run
        line = epoch_line(t, epoch, result)
        if (epoch + 1) % run.config.runtime.eval_every == 0 or epoch + 1 == run.config.optim.epoch:
            metrics = evaluate_epoch(run, t, epoch, line)
        else:
            log.info("epoch %d: loss %.4f", epoch, result.stats["loss"])
        save(run, state)
        exp_logger.epoch_line(line)
        exp_logger.flush()
        stop_if_signalled(run, t, epoch)
    exp_logger.close()
    if run.is_main and metrics:
        log.info("%s", final_summary(metrics, state.best))
    return {"final": metrics, "best": state.best, "global_step": state.global_step,
            "output_dir": str(run.output_dir)}


def announce(run: Run) -> None:
    """What the run's settings imply, said before it starts."""
    per_class = run.config.data.eval_per_class
    if per_class is not None and run.is_main:
        log.warning("--eval_per_class %d: evaluating on at most %d sketches and photos per unseen class, not the "
                    "full split: the mAP is not comparable with the paper's, and best.pth is chosen on this subset "
                    "(test.py evaluates the full split).", per_class, per_class)
    if run.config.synthetic and run.is_main:
        log.info("no --data_path: training the '%s' preset on the built-in synthetic benchmark.",
                 run.config.model.arch)
    if run.is_main and (eps_note := ln_eps_mismatch(run.config.model)):
        log.warning("%s", eps_note)
    if run.device.type == "cuda":  # fixed image sizes: let cuDNN time and keep the fastest stem convolutions
        torch.backends.cudnn.benchmark = True


def build(run: Run) -> tuple[dict, TrainState, torch.nn.Module]:
    """The data, a fresh :class:`TrainState` (the model, its optimizer and fp16 scaler, the bad-file log, the
    health monitor) and the criterion."""
    from datasets import build_datasets
    from losses import build_criterion
    from models import build_model, check_starting_weights, model_summary

    config = run.config
    resume = config.runtime.resume
    if not resume:  # resumed, the checkpoint gives every weight: --vit_weights is neither checked nor read
        check_starting_weights(config)  # a --vit_weights that does not fit stops the run before any data is read
    mask_cache = None
    if config.model.vxl_cache:
        from models.vxl_cache import load_mask_cache_for_training

        mask_cache = load_mask_cache_for_training(config.model.vxl_cache, config)  # checks settings, no CLIP
    data = build_datasets(config, mask_cache=mask_cache)
    log.info("data: %s", json.dumps(data["split"].summary()))
    config = config.replace(num_seen_classes=len(data["train"].label_names))  # the class head's size
    built_as = config.replace(vit_weights=None) if resume else config
    model = build_model(built_as, with_sampler=mask_cache is None).to(run.device)
    log.info("model: %s", json.dumps(model_summary(model)))
    criterion = build_criterion(config).to(run.device)
    state = TrainState.for_training(config, model, criterion, output_dir=run.output_dir, amp_dtype=run.amp_dtype,
                                    rank=run.rank, world=run.world)
    return data, state, criterion


def prepare_model(state: TrainState, run: Run) -> torch.nn.Module:
    """torch.compile (--compile), then SyncBatchNorm and DDP (several processes): what trains and evaluates."""
    runtime = run.config.runtime
    if runtime.compile:
        compile_model(state.model, backend=runtime.compile_backend, mode=runtime.compile_mode)
    state.model, trained = dist_utils.wrap_ddp(state.model, run.device, run.world)
    return trained


@dataclass
class Training:
    """What the epoch loop works with."""

    state: TrainState
    loop: engine.TrainLoop  # the model as it trains (compiled, DDP), the criterion, the logger, the stop flag
    loaders: dict
    class_names: list  # the unseen classes, in label order
    pictures: TrainingPictures | None  # rank 0's, unless --no_tb_images


def save(run: Run, state: TrainState, name: str = "checkpoint.pth", *, all_ranks: bool = True) -> None:
    """Rank 0 writes the run's state to ``name``; with ``all_ranks`` (every rank calls it) each rank's random
    state is kept."""
    if state.save(run.output_dir / name, all_ranks=all_ranks) is not None:
        discard_overwritten(run.output_dir)  # --overwrite's previous run, kept until now


def train_epoch(run: Run, t: Training, epoch: int) -> engine.EpochResult:
    """Train ``epoch`` (from where an interrupted run stopped); an interruption saves and ends the run."""
    state = t.state
    t.loaders["sampler"].set_epoch(epoch, skip=state.skip_batches * (run.config.optim.batch_size // run.world))
    result = engine.train_one_epoch(t.loop, t.loaders["train"], epoch=epoch, global_step=state.global_step,
                                    carry=state.partial_epoch)
    state.global_step, state.partial_epoch = result.global_step, result.partial
    if result.interrupted:  # a signal, or a collapse with --on_collapse stop
        state.skip_batches += result.steps_taken
        save(run, state)
        t.loop.exp_logger.close()
        stop_interrupted(run, state, epoch, collapsed=result.collapsed)
    state.next_epoch, state.skip_batches, state.partial_epoch = epoch + 1, 0, None
    return result


def stop_interrupted(run: Run, state: TrainState, epoch: int, *, collapsed: bool) -> None:
    """Exit after an interrupted epoch's checkpoint: 2 after a collapse, 130/143 after SIGINT/SIGTERM."""
    checkpoint = run.output_dir / "checkpoint.pth"
    if collapsed:
        log.error("stopped at step %d because the embeddings collapsed (--on_collapse stop); checkpoint "
                  "saved to %s. Change the settings and start a new --exp (see the warning above).",
                  state.global_step, checkpoint)
        raise SystemExit(2)
    log.warning("stopped by %s during epoch %d at step %d; checkpoint saved to %s. Continue with --resume.",
                run.stop.signal, epoch, state.global_step, checkpoint)
    raise SystemExit(run.stop.exit_code)


def epoch_line(t: Training, epoch: int, result: engine.EpochResult) -> dict:
    """log.txt's line of a trained epoch (without its evaluation); its training figures go to TensorBoard."""
    stats, exp_logger = result.stats, t.loop.exp_logger
    line = {"epoch": epoch, "step": t.state.global_step, **{f"train_{k}": v for k, v in stats.items()},
            "bad_files_skipped": t.state.bad_files.failed}
    exp_logger.scalars({k: v for k, v in stats.items() if k.startswith("loss")}, epoch, prefix="train/")
    exp_logger.scalars({k: stats[k] for k in ("lr", "epoch_time", "samples_per_s")}, epoch, prefix="speed/")
    return line


def evaluate_epoch(run: Run, t: Training, epoch: int, line: dict) -> dict:
    """Evaluate after ``epoch``: metrics into ``line`` and TensorBoard, best.pth when mAP@all improves."""
    state, exp_logger = t.state, t.loop.exp_logger
    try:
        result = engine.evaluate(t.loop.model, t.loaders["query"], t.loaders["gallery"], device=run.device,
                                 amp_dtype=run.amp_dtype, class_names=t.class_names, progress=t.loop.progress,
                                 return_features=t.pictures is not None)
    except Exception:  # keep the epoch just trained: --resume goes on, test.py can evaluate it
        save(run, state, all_ranks=False)  # other ranks may not get here: no collective
        log.error("the evaluation after epoch %d failed; the trained epoch is saved in %s", epoch,
                  run.output_dir / "checkpoint.pth")
        raise
    metrics = result.metrics
    if result.features is not None:
        t.pictures.log(exp_logger, state.model, result.features, device=run.device, step=epoch)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    exp_logger.scalars(scalars, epoch, prefix="test/")
    line.update({f"test_{k}": v for k, v in scalars.items()})
    log.info("epoch %d: loss %.4f | unseen mAP@all %.4f  P@100 %.4f  mAP@200 %.4f  P@200 %.4f (chance %.4f)",
             epoch, line["train_loss"], metrics["mAP@all"], metrics["P@100"], metrics["mAP@200"], metrics["P@200"],
             metrics["chance_mAP"])
    if state.update_best(metrics, epoch):
        save(run, state, "best.pth")
    return metrics


def stop_if_signalled(run: Run, t: Training, epoch: int) -> None:
    """After a saved epoch: exit (130/143) when any rank got SIGINT/SIGTERM during it."""
    if dist_utils.any_rank(run.stop(), run.device):
        log.warning("stopped by %s after epoch %d; continue with --resume.",
                    run.stop.signal or "a signal to another rank", epoch)
        t.loop.exp_logger.close()
        raise SystemExit(run.stop.exit_code)


if __name__ == "__main__":
    main()
