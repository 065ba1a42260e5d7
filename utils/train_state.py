"""The state of a training run: everything its checkpoint holds, saved in one call and restored in one call.

:class:`TrainState` owns the objects a run trains (the model, the optimizer, the GradScaler, the
bad-file log, the health monitor) and the run's position (``next_epoch``, ``skip_batches``,
``global_step``, ``best``, ``partial_epoch``). :meth:`TrainState.save` writes them, with every rank's
random state and the run's configuration, as one checkpoint (atomically, :func:`utils.checkpoint.save_checkpoint`);
:meth:`TrainState.restore` reads one back **by name**: each object from the entry of its name through its
``load_state_dict``, each value into the attribute of its name (as DINO's ``restart_from_checkpoint``).

The file is a plain dict (format :data:`CHECKPOINT_FORMAT`; format 1 had ``args``, the flat flags, where
format 2 has ``config``: both load, :func:`utils.config.config_from_checkpoint`):

=================  ==========================================================================
``model``          the trainable weights (no wrappers, no frozen CLIP sampler)
``optimizer``      ``optimizer.state_dict()``
``scaler``         the fp16 GradScaler's state, or None
``next_epoch``     the epoch to train next
``skip_batches``   its batches already trained (an interrupted epoch; else 0)
``global_step``    optimizer steps so far
``best``           ``{"mAP@all", "epoch", ...}`` of the best evaluation (-1 before any)
``rng``            rank 0's random state (:func:`utils.checkpoint.rng_state`)
``rng_per_rank``   every rank's random state, in rank order
``config``         the run's resolved configuration, ``RunConfig.to_dict()``
``arch``           its preset
``format``         :data:`CHECKPOINT_FORMAT`
``bad_files``      the bad-file log's counts
``partial_epoch``  loss sums of the trained part of ``next_epoch`` (None unless ``skip_batches``)
``health``         the health monitor's state
=================  ==========================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
import logging

from utils import distributed as dist_utils
from utils.config import ConfigError, RunConfig, config_from_checkpoint, resume_differences
from utils.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, load_model_weights,
                              model_state_dict, rng_state, save_checkpoint, set_rng_state)

__all__ = ["TrainState", "check_resume_config"]

log = logging.getLogger("train")


class TrainState:
    """Everything a training run's checkpoint holds; :meth:`save` writes it, :meth:`restore` reads it back.

    ``model`` may be wrapped (DDP, torch.compile): its bare weights are saved, without the frozen
    sampler. ``scaler``, ``bad_files`` and ``health`` may be None (no fp16; no bad-file log or health
    monitor): None is saved and nothing is restored into them. ``rank`` and ``world`` are this process's
    place among the torchrun processes: every rank keeps its own random state.
    """

    # Saved with state_dict() and restored with load_state_dict(), under these names (the model through
    # model_state_dict / load_model_weights).
    OBJECTS = ("model", "optimizer", "scaler", "bad_files", "health")
    # Saved and restored as they are, from and into the attributes of these names.
    VALUES = ("next_epoch", "skip_batches", "global_step", "best", "partial_epoch")
    # Entries a checkpoint written by train.py always has.
    REQUIRED = ("model", "optimizer", "next_epoch", "global_step", "best")
    # The checkpoint's entries, in the order they are written.
    LAYOUT = ("model", "optimizer", "scaler", "next_epoch", "skip_batches", "global_step", "best", "rng",
              "rng_per_rank", "config", "arch", "format", "bad_files", "partial_epoch", "health")

    def __init__(self, config: RunConfig, *, model, optimizer, scaler=None, bad_files=None, health=None,
                 rank: int = 0, world: int = 1):
        self.config = config
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.bad_files, self.health = bad_files, health
        self.rank, self.world = rank, world
        self.next_epoch = 0
        self.skip_batches = 0
        self.global_step = 0
        self.best = {"mAP@all": -1.0, "epoch": -1}
        self.partial_epoch = None

    @classmethod
    def for_training(cls, config: RunConfig, model, criterion, *, output_dir: Path, amp_dtype, rank: int = 0,
                     world: int = 1) -> "TrainState":
        """A fresh run's state: Adam over the model's trainable parameters, a GradScaler for fp16, the bad-file log
        (rank 0 writes bad_files.txt) and the health monitor of the criterion's triplet loss."""
        import torch

        from datasets.robust import BadFileLog
        from utils.health import HealthMonitor

        optimizer = torch.optim.Adam(list(model.trainable_parameters()), lr=config.optim.lr,
                                     weight_decay=config.optim.weight_decay)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        bad_files = BadFileLog(Path(output_dir) / "bad_files.txt" if rank == 0 else None,
                               max_fraction=config.data.max_bad_fraction)
        runtime = config.runtime
        health = HealthMonitor(distance=criterion.triplet.pair_distance, margin=criterion.triplet.margin,
                               on_collapse=runtime.on_collapse, log_every=runtime.log_every,
                               patience=runtime.collapse_patience)
        return cls(config, model=model, optimizer=optimizer, scaler=scaler, bad_files=bad_files, health=health,
                   rank=rank, world=world)

    def update_best(self, metrics: dict, epoch: int) -> bool:
        """Keep ``metrics`` as the best evaluation when its mAP@all beats it; True when it does."""
        if metrics["mAP@all"] <= self.best["mAP@all"]:
            return False
        self.best = {"mAP@all": metrics["mAP@all"], "epoch": epoch,
                     **{k: metrics[k] for k in ("mAP@200", "P@100", "P@200")}}
        return True

    def state_dict(self, rngs: list[dict] | None = None) -> dict:
        """The checkpoint's dict; ``rngs``: every rank's :func:`rng_state` (default: this process's alone)."""
        rngs = rngs if rngs is not None else [rng_state()]
        entries = {name: None if getattr(self, name) is None else getattr(self, name).state_dict()
                   for name in self.OBJECTS if name != "model"}
        entries.update({name: getattr(self, name) for name in self.VALUES})
        entries.update(model=model_state_dict(self.model), rng=rngs[0], rng_per_rank=rngs,
                       config=self.config.to_dict(), arch=self.config.model.arch, format=CHECKPOINT_FORMAT)
        return {name: entries[name] for name in self.LAYOUT}

    def save(self, path: str | os.PathLike, *, all_ranks: bool = True) -> Path | None:
        """Write the checkpoint to ``path`` atomically from rank 0; return the path there, None on other ranks.

        With ``all_ranks`` every rank must call it (a collective gathers each rank's random state);
        without, only this process's state is kept (a call that other ranks may not make).
        """
        rngs = dist_utils.all_gather_objects([rng_state()]) if all_ranks else [rng_state()]
        if self.rank != 0:
            return None
        return save_checkpoint(self.state_dict(rngs), path)

    def restore(self, path: str | os.PathLike) -> None:
        """Continue from the checkpoint at ``path``: objects, values and this rank's random state, by name.

        First :func:`check_resume_config` refuses another run's checkpoint, before anything is loaded. This rank
        continues its own random streams; a checkpoint of another world size starts every rank from rank 0's.
        """
        ckpt = load_checkpoint(path)
        check_resume_config(self.config, ckpt, path)
        missing = [name for name in self.REQUIRED if name not in ckpt]
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}: it is not a training checkpoint of "
                                  f"train.py, which --resume needs (start a new --exp).")
        load_model_weights(self.model, ckpt["model"], source=str(path))
        for name in self.OBJECTS[1:]:
            if getattr(self, name) is not None and ckpt.get(name):
                getattr(self, name).load_state_dict(ckpt[name])
        for name in self.VALUES:
            if name in ckpt:
                setattr(self, name, ckpt[name])
        if not self.skip_batches:  # the loss sums of an epoch's first part mean nothing at its start
            self.partial_epoch = None
        per_rank = ckpt.get("rng_per_rank") or []
        set_rng_state(per_rank[self.rank] if len(per_rank) == self.world else ckpt["rng"])
        best = self.best["mAP@all"]
        log.info("resumed from epoch %d (after %d batches), step %d, best mAP@all %s", self.next_epoch,
                 self.skip_batches, self.global_step, f"{best:.4f}" if best >= 0 else "none yet (not evaluated)")


def check_resume_config(config: RunConfig, ckpt: dict, path) -> None:
    """Refuse a checkpoint whose run-defining settings differ from ``config`` (ConfigError naming them); log the
    settings that may change on resume and did."""
    saved = config_from_checkpoint(ckpt, str(path))
    defining, resumable = resume_differences(config, saved)
    if defining:
        raise ConfigError(f"--resume: {path} was trained with other settings; resuming with "
                          + "; ".join(f"--{k} {ours!r} (the run has {theirs!r})" for k, ours, theirs in defining)
                          + " would make it another run. Resume with the run's values (see args.json), or start a "
                          "new --exp.")
    if resumable:
        log.info("--resume with changed flags: %s",
                 "; ".join(f"--{k} {ours!r} (was {theirs!r})" for k, ours, theirs in resumable))
