"""The loops: one training step and epoch, feature extraction, evaluation. No other file loops over a DataLoader
or writes a training step (:func:`train_step` is the only one)."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
from tqdm import tqdm

from utils import distributed as dist_utils
from utils.checkpoint import strip_wrappers
from utils.metrics import chance_level, retrieval_metrics

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and the last good checkpoint stays."""

    def __init__(self, step: int, terms: dict):
        self.step = step
        self.terms = terms
        shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        super().__init__(
            f"non-finite loss at optimizer step {step} ({shown}). The run stops here; the last good "
            f"checkpoint is untouched. Lower --lr, or try --amp none if mixed precision is on."
        )


def move_to(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def train_step(
    model: Callable[[dict], dict],
    criterion: torch.nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    *,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    device: torch.device | None = None,
    step: int = 0,
) -> tuple[dict, dict]:
    """One optimizer step, the only copy of it: :func:`train_one_epoch`, ``tools.bench_train`` and
    ``tests/test_cuda.py`` all call this.

    In order: ``batch`` to ``device`` (left where it is when ``device`` is None); ``model(batch)``
    under autocast to ``amp_dtype`` (none when None); the floating outputs cast to fp32 and the
    losses computed from them in fp32; a non-finite ``loss`` raises :class:`NonFiniteLossError`
    (``step`` is the number it reports: the optimizer step this one would be) before any gradient
    is touched; ``optimizer.zero_grad(set_to_none=True)``; backward and the optimizer step, through
    ``scaler`` when given (fp16). Returns ``(losses, outputs)``: the criterion's terms (``loss`` the
    one that was back-propagated) and the model's outputs in fp32.
    """
    if device is not None:
        batch = move_to(batch, device)
        device_type = device.type
    else:  # autocast on the device the batch is on
        device_type = next((v.device.type for v in batch.values() if torch.is_tensor(v)), "cpu")
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        outputs = model(batch)
    # Losses in fp32: the triplet margin and the MSE are sensitive to bf16 rounding.
    outputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()}
    losses = criterion(outputs)
    loss = losses["loss"]
    if not torch.isfinite(loss):
        raise NonFiniteLossError(step, {k: float(v.detach()) for k, v in losses.items()})
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return losses, outputs


def linear_warmup(base_lr: float, warmup_steps: int) -> Callable[[int], float]:
    """The learning rate of optimizer step ``step`` (counted from 1): ``base_lr * step / warmup_steps`` during the
    first ``warmup_steps`` steps, ``base_lr`` after them (and always, for ``warmup_steps`` 0).

    A function of the step alone, set before every step (as MAE's ``lr_sched``) rather than a scheduler's
    state: a resumed run continues the same schedule, with the ``--lr`` it is resumed with.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return lambda step: base_lr * min(1.0, step / warmup_steps) if warmup_steps else base_lr


def _account_bad_files(batch: dict, bad_file_log, device: torch.device) -> None:
    """Take the batch's unreadable files (``bad_files``) and its number of draws (``draws``) out of ``batch``
    into ``bad_file_log`` (when there is one).

    Counted over all ranks, so every rank keeps the same totals and stops at the same step when
    --max_bad_fraction is passed; rank 0 writes every rank's file names.
    """
    bad, draws = batch.pop("bad_files", None), batch.pop("draws", None)
    if bad_file_log is not None and draws is not None:
        n_bad, n_draws = dist_utils.all_reduce_sum_ints([len(bad or []), int(draws.sum())], device)
        if n_bad and dist_utils.is_dist():
            bad = dist_utils.all_gather_objects(bad or [])
        bad_file_log.update(bad or [], n_draws)


def _whole_epoch_sums(sums: dict, steps: int, carry: dict | None, device: torch.device) -> tuple[dict, int]:
    """The loss sums of ``steps`` steps, averaged over ranks (the same on every rank), plus those of the
    epoch's earlier part (``carry``, or none): ``(sums, steps)`` of the epoch so far."""
    carry = carry or {"sums": {}, "steps": 0}
    rank_mean_sums = {k: dist_utils.all_reduce_mean(v, device) for k, v in sums.items()}
    return {k: carry["sums"].get(k, 0.0) + v for k, v in rank_mean_sums.items()}, carry["steps"] + steps


def train_one_epoch(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    global_step: int = 0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    exp_logger=None,
    log_every: int = 10,
    should_stop: Callable[[], bool] = lambda: False,
    bad_file_log=None,
    progress: bool = True,
    carry: dict | None = None,
    health=None,
    lr_at: Callable[[int], float] | None = None,
) -> dict:
    """Train for one pass over ``loader``, one :func:`train_step` per batch; return averaged loss terms and
    throughput.

    ``should_stop`` is polled after every step (a signal handler sets it): the epoch then ends early
    and the result says ``interrupted``. The returned ``steps`` is the number of optimizer steps taken.
    ``bad_file_log`` (a :class:`datasets.robust.BadFileLog`) receives the unreadable files that the
    dataset skipped in each batch.

    ``carry`` continues an interrupted epoch: the ``partial`` entry of the result that stopped it
    (loss sums over its steps, averaged over ranks, and their count), so the epoch's averages are
    those of an uninterrupted epoch.

    ``health`` (a :class:`utils.health.HealthMonitor`) gets every step's triplet accuracy, active
    fraction and embedding spread; when it asks to stop (a collapse with ``--on_collapse stop``) the
    epoch ends after that step, ``interrupted`` and ``collapsed`` set.

    ``lr_at(step)`` (e.g. :func:`linear_warmup`) sets the learning rate of every parameter group before each
    optimizer step (counted from 1 over the run); None leaves the optimizer's own.
    """
    model.train()
    criterion.train()
    sums: dict[str, float] = {}
    steps = samples = 0
    interrupted = False
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, dynamic_ncols=True, leave=False)
    for batch in bar:
        _account_bad_files(batch, bad_file_log, device)
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step + 1)
        losses, outputs = train_step(model, criterion, batch, optimizer, amp_dtype=amp_dtype, scaler=scaler,
                                     device=device, step=global_step + 1)
        steps += 1
        global_step += 1
        samples += batch["sketch"].shape[0]
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        if progress:
            bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}")
        if exp_logger is not None and global_step % log_every == 0:
            exp_logger.scalars({k: float(v.detach()) for k, v in losses.items()}, global_step, prefix="train_step/")
        if health is not None:
            health.update(global_step, losses, outputs)
        collapsed = health is not None and health.stop_requested  # ranks see other batches: any one stops all
        if dist_utils.any_rank(should_stop() or collapsed, device):  # every rank stops at the same step
            interrupted = True
            break
    bar.close()
    elapsed = time.perf_counter() - start
    epoch_sums, epoch_steps = _whole_epoch_sums(sums, steps, carry, device)
    stats = {k: v / max(epoch_steps, 1) for k, v in epoch_sums.items()}
    stats.update(
        steps=steps,
        epoch_steps=epoch_steps,
        partial={"sums": epoch_sums, "steps": epoch_steps},
        global_step=global_step,
        epoch_time=elapsed,
        samples_per_s=samples * dist_utils.get_world_size() / elapsed if elapsed > 0 else math.nan,
        lr=optimizer.param_groups[0]["lr"],
        interrupted=interrupted,
        collapsed=dist_utils.any_rank(health is not None and health.stop_requested, device),
    )
    if health is not None and not interrupted:  # an interrupted epoch's sums go into the checkpoint
        stats.update(health.epoch_means())
    return stats


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader,
    *,
    device: torch.device,
    modality: str,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    failed_out: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed every item of ``loader`` once, in eval mode: ``(features [N, D] fp32, labels [N], indices [N])``.

    With several processes each rank embeds its share (the loader's sampler decides which) and every
    rank receives all embeddings, ordered by dataset index. Items whose image could not be read
    (``ok`` False) are left out and appended to ``failed_out`` as ``(path, reason)``.
    """
    net = strip_wrappers(model)
    was_training = net.training
    net.eval()
    feats, labels, indices, failed = [], [], [], []
    for batch in tqdm(loader, desc=f"embed {modality}", disable=not progress, dynamic_ncols=True, leave=False):
        ok = batch.get("ok", torch.ones(batch["image"].shape[0], dtype=torch.bool))
        if not ok.all():  # unreadable images (datasets.robust.AccountedImages): named, left out
            failed += [(p, e) for p, e, good in zip(batch["path"], batch["errors"], ok.tolist()) if not good]
        images = batch["image"] if ok.all() else batch["image"][ok]  # no copy (pinned memory kept) when all ok
        images = images.to(device, non_blocking=True)
        if images.shape[0] == 0:
            continue
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            emb = net.encode(images, modality)  # [b, D]
        feats.append(emb.float())
        labels.append(batch["label"][ok].to(device))
        indices.append(batch["index"][ok].to(device))
    net.train(was_training)
    dim = getattr(getattr(net, "encoder", None), "embed_dim", 0)
    feats = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
    feats = dist_utils.all_gather_concat(feats)
    labels = dist_utils.all_gather_concat(labels)
    indices = dist_utils.all_gather_concat(indices)
    order = torch.argsort(indices)
    if failed_out is not None:
        failed_out.extend(dist_utils.all_gather_objects(failed))
    return feats[order], labels[order], indices[order]


def evaluate(
    model: torch.nn.Module,
    query_loader,
    gallery_loader,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    class_names: list[str] | None = None,
    progress: bool = True,
    return_features: bool = False,
) -> dict:
    """Zero-shot retrieval on the unseen classes: sketches query, photos are the gallery.

    Returns the metrics of :func:`utils.metrics.retrieval_metrics` (mAP@all, mAP@200, P@100, P@200,
    the SAKE-convention mAP@200 and per-class mAP@all), plus query/gallery counts.
    """
    q_failed, g_failed = [], []
    q_feats, q_labels, _ = extract_features(model, query_loader, device=device, modality="sketch",
                                            amp_dtype=amp_dtype, progress=progress, failed_out=q_failed)
    g_feats, g_labels, _ = extract_features(model, gallery_loader, device=device, modality="photo",
                                            amp_dtype=amp_dtype, progress=progress, failed_out=g_failed)
    for kind, failed, feats in (("queries", q_failed, q_feats), ("gallery photos", g_failed, g_feats)):
        if failed and feats.shape[0] == 0:  # nothing left to rank: say which files, not "shape (0, D)"
            from datasets.filelist import DatasetError

            raise DatasetError(
                f"none of the {len(failed)} unseen-class {kind} could be read, e.g. {failed[0][1]}. Check the "
                f"test split with python -m datasets.prepare --check ROOT --dataset ... --verify_images")
        if failed:
            log.warning("%d %s could not be read and are left out of the metrics, e.g. %s",
                        len(failed), kind, failed[0][1])
    names = dict(enumerate(class_names)) if class_names is not None else None
    metrics = retrieval_metrics(q_feats, q_labels, g_feats, g_labels, per_class=True, class_names=names)
    metrics["num_queries"] = int(q_feats.shape[0])
    metrics["num_gallery"] = int(g_feats.shape[0])
    metrics["num_queries_unreadable"] = len(q_failed)
    metrics["num_gallery_unreadable"] = len(g_failed)
    metrics["_unreadable"] = {"queries": q_failed, "gallery": g_failed}
    # Chance level: the fraction of the gallery that is relevant, averaged over queries.
    metrics["chance_mAP"] = chance_level(q_labels, g_labels)
    if return_features:
        metrics["_features"] = {
            "query": q_feats.cpu(), "query_labels": q_labels.cpu(),
            "gallery": g_feats.cpu(), "gallery_labels": g_labels.cpu(),
        }
    return metrics
