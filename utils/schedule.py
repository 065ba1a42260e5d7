"""The optimisation schedule of a run: how many optimizer updates it makes, and how that compares with the
released recipe (the ``b16`` preset's)."""
from __future__ import annotations

import logging

from utils.config import RunConfig

__all__ = ["planned_updates", "schedule_warning", "log_schedule", "SCHEDULE_SETTINGS"]

log = logging.getLogger("train")

SCHEDULE_SETTINGS = ("batch_size", "datasetLen", "epoch")  # what decides the number of updates


def planned_updates(triplets: int, batch_size: int, epochs: int, world: int = 1) -> int:
    """Optimizer updates of a run, as ``datasets.build_loaders``' DataLoader makes them.

    Each of ``world`` processes takes ``triplets // world`` triplets per epoch (TripletIndexSampler)
    in batches of ``batch_size // world``, the last one short (drop_last=False).
    """
    per_rank, per_batch = triplets // world, batch_size // world
    return epochs * -(-per_rank // per_batch)


def schedule_warning(config: RunConfig, updates: int):
    """The warning for a ``b16`` run whose schedule is not the released one, else None."""
    from utils.presets import get_preset

    ours, released = config.flat(), get_preset("b16").flat()
    if config.model.arch != "b16" or all(ours[k] == released[k] for k in SCHEDULE_SETTINGS):
        return None
    released_updates = planned_updates(released["datasetLen"], released["batch_size"], released["epoch"])
    ratio = released_updates / updates
    travel = f"about {ratio:.3g} times less far" if ratio >= 1 else f"about {1 / ratio:.3g} times further"
    restore = " ".join(f"--{k} {released[k]}" for k in SCHEDULE_SETTINGS if ours[k] != released[k])
    return (f"this schedule makes {updates:,} optimizer updates against the released {released_updates:,} (batch "
            f"{released['batch_size']} x {released['datasetLen']:,} triplets x {released['epoch']} epochs); "
            f"Adam's step size hardly depends on the batch, so the weights travel {travel}. It is not the released "
            f"schedule and has not been validated; {restore} restores it.")


def log_schedule(config: RunConfig, triplets: int, world: int) -> None:
    optim = config.optim
    updates = planned_updates(triplets, optim.batch_size, optim.epoch, world)
    log.info("schedule: %d epochs x %d steps (batch %d, %d triplets per epoch) = %d optimizer updates; Adam lr %g%s",
             optim.epoch, updates // optim.epoch, optim.batch_size, triplets, updates, optim.lr,
             f" after a linear warm-up over the first {optim.warmup_steps} steps" if optim.warmup_steps
             else ", constant")
    warning = schedule_warning(config, updates)
    if warning:
        log.warning("%s", warning)
