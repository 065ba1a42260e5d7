"""torch.distributed helpers for torchrun: set-up, rank queries, gathering evaluation features.

One process per GPU (or several CPU processes with the gloo backend, which is how the tests run it).
Nothing here does anything unless the process was started by torchrun (``WORLD_SIZE`` > 1).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """Initialise the default process group from torchrun's environment.

    Returns ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` for a plain ``python train.py``.
    The backend is NCCL for CUDA and gloo for CPU.
    """
    if not launched_by_torchrun():
        return 0, 1, 0
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not is_dist():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    log.info("distributed: rank %d of %d (local rank %d, %s)", rank, world_size, local_rank, backend)
    return rank, world_size, local_rank


def check_global_batch(batch_size: int, world: int) -> None:
    """Refuse (exit 2) a global ``--batch_size`` the ``world`` processes cannot split evenly."""
    if batch_size % world:
        from utils.runtime import UserError

        cleanup()
        raise UserError(f"--batch_size {batch_size} (the global batch) is not divisible by the {world} "
                        f"processes of torchrun: use a multiple of {world}.")


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_gather_concat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [n_r, ...] from every rank along dim 0 (n_r may differ per rank)."""
    if not is_dist():
        return tensor
    world = get_world_size()
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)], dim=0)


def all_reduce_mean(value: float, device) -> float:
    """Average a Python float over ranks (for logging losses)."""
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / get_world_size()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum_ints(values: list[int], device) -> list[int]:
    """Element-wise sum of a few integers over ranks (one small collective)."""
    if not is_dist():
        return [int(v) for v in values]
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def any_rank(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is True on any: ranks must leave a loop at the same step, or
    the others wait forever in their next collective (a signal reaches torchrun's workers one by one)."""
    if not is_dist():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(items: list) -> list:
    """Concatenate a picklable list from every rank (rank order)."""
    if not is_dist():
        return list(items)
    out = [None] * get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def wrap_ddp(model: torch.nn.Module, device: torch.device, world: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(model, what trains)`` for ``world`` processes: with several, BatchNorms made SyncBatchNorm on GPUs (the
    tiny preset's stem: statistics over the global batch) and the model wrapped in DDP; with one, both are
    ``model``."""
    if world == 1:
        return model, model
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # SyncBatchNorm needs GPUs
            log.warning("--stem_norm batch with %d CPU processes: BatchNorm statistics are per process, so "
                        "results differ slightly from one process.", world)
    device_ids = [device.index] if device.type == "cuda" else None
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
