"""The DataLoaders of a training run: the triplet stream (each process its share) and the evaluation sets."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from utils.config import RunConfig

from .robust import AccountedImages, SkipBadTriplets, collate_skipping
from .sampling import TripletIndexSampler

__all__ = ["build_loaders"]


def build_loaders(data: dict, config: RunConfig, *, rank: int, world: int, device: torch.device) -> dict:
    """``{"train", "sampler", "query", "gallery"}`` for ``data`` (``datasets.build_datasets``); ``world`` divides
    the global batch."""
    per_rank = config.optim.batch_size // world
    workers = config.data.num_workers
    options = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                   prefetch_factor=4 if workers > 0 else None)
    sampler = TripletIndexSampler(len(data["train"]), rank=rank, world_size=world)
    # Its own generator: starting an epoch's iterator then draws no number from the global RNG (which
    # drives dropout), so a run resumed mid-epoch continues the same random stream.
    train = DataLoader(SkipBadTriplets(data["train"]), batch_size=per_rank, sampler=sampler, drop_last=False,
                       collate_fn=collate_skipping, generator=torch.Generator().manual_seed(config.runtime.seed),
                       **options)
    eval_batch = config.runtime.eval_batch_size or 2 * per_rank

    def eval_loader(dataset):
        accounted = AccountedImages(dataset)  # outside the Subset: an unreadable item keeps its dataset index
        share = Subset(accounted, range(rank, len(dataset), world)) if world > 1 else accounted
        return DataLoader(share, batch_size=eval_batch, shuffle=False, collate_fn=collate_skipping, **options)

    return {"train": train, "sampler": sampler, "query": eval_loader(data["query"]),
            "gallery": eval_loader(data["gallery"])}
