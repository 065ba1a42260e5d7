"""The loops: one training step and epoch, feature extraction, evaluation. No other file loops over a DataLoader
or writes a training step (:func:`train_step` is the only one)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from utils import distributed as dist_utils
from utils.checkpoint import strip_wrappers
from utils.metrics import chance_level, retrieval_metrics
from utils.progress import progress_bar

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


@dataclass
class TrainLoop:
    """What every epoch trains with: the same objects from one epoch to the next."""

    model: torch.nn.Module  # what trains (possibly DDP/compiled)
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    exp_logger: object = None  # utils.logger.ExperimentLogger or None
    log_every: int = 10
    should_stop: Callable[[], bool] = lambda: False
    bad_file_log: object = None  # datasets.robust.BadFileLog or None
    progress: bool = True
    health: object = None  # utils.health.HealthMonitor or None
    lr_at: Callable[[int], float] | None = None


@dataclass
class EpochResult:
    """What one :func:`train_one_epoch` call did.

    ``stats`` holds only numbers: the epoch's mean loss terms (``loss``, ``loss_tri``, ...), ``lr``,
    ``epoch_time``, ``samples_per_s``, ``steps`` (the whole epoch's optimizer steps, across an interruption)
    and, when the epoch was not interrupted, the health monitor's epoch means. ``steps_taken`` counts the
    steps of this call alone (what a resumed run skips); ``partial`` is the ``carry`` that resumes an
    interrupted epoch.
    """

    stats: dict
    steps_taken: int
    global_step: int
    partial: dict
    interrupted: bool
    collapsed: bool


@dataclass
class _Tally:
    """The running totals of one :func:`train_one_epoch` call, on this rank."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0


def _take_step(loop: TrainLoop, batch: dict, step: int) -> tuple[dict, dict]:
    """Optimizer step ``step`` (counted from 1 over the run) on ``batch``: its unreadable files accounted,
    the learning rate set from ``loop.lr_at``, then :func:`train_step`."""
    _account_bad_files(batch, loop.bad_file_log, loop.device)
    if loop.lr_at is not None:
        for group in loop.optimizer.param_groups:
            group["lr"] = loop.lr_at(step)
    return train_step(loop.model, loop.criterion, batch, loop.optimizer, amp_dtype=loop.amp_dtype,
                      scaler=loop.scaler, device=loop.device, step=step)


def _record_step(loop: TrainLoop, tally: _Tally, bar, batch: dict, losses: dict, outputs: dict, step: int) -> None:
    """Count step ``step`` (already taken) into ``tally``, the progress bar, ``train_step/`` every
    ``loop.log_every`` steps, and the health monitor."""
    tally.steps += 1
    tally.samples += batch["sketch"].shape[0]
    for k, v in losses.items():
        tally.sums[k] = tally.sums.get(k, 0.0) + float(v.detach())
    if loop.progress:
        bar.set_postfix(loss=f"{tally.sums['loss'] / tally.steps:.4f}")
    if loop.exp_logger is not None and step % loop.log_every == 0:
        loop.exp_logger.scalars({k: float(v.detach()) for k, v in losses.items()}, step, prefix="train_step/")
    if loop.health is not None:
        loop.health.update(step, losses, outputs)


def _stop_now(loop: TrainLoop) -> bool:
    """Whether the epoch ends after this step: a signal, or a collapse that asks to stop, on any rank (ranks
    see other batches, and every rank must stop at the same step)."""
    collapsed = loop.health is not None and loop.health.stop_requested
    return dist_utils.any_rank(loop.should_stop() or collapsed, loop.device)


def _epoch_result(loop: TrainLoop, tally: _Tally, *, elapsed: float, global_step: int, carry: dict | None,
                  interrupted: bool) -> EpochResult:
    """The epoch's averages over ranks and over its earlier, interrupted part (``carry``), and its throughput."""
    epoch_sums, epoch_steps = _whole_epoch_sums(tally.sums, tally.steps, carry, loop.device)
    stats = {k: v / max(epoch_steps, 1) for k, v in epoch_sums.items()}
    stats.update(
        steps=epoch_steps,
        epoch_time=elapsed,
        samples_per_s=tally.samples * dist_utils.get_world_size() / elapsed if elapsed > 0 else math.nan,
        lr=loop.optimizer.param_groups[0]["lr"],
    )
    collapsed = dist_utils.any_rank(loop.health is not None and loop.health.stop_requested, loop.device)
    if loop.health is not None and not interrupted:  # an interrupted epoch's sums go into the checkpoint
        stats.update(loop.health.epoch_means())
    return EpochResult(stats=stats, steps_taken=tally.steps, global_step=global_step,
                       partial={"sums": epoch_sums, "steps": epoch_steps}, interrupted=interrupted,
                       collapsed=collapsed)


def train_one_epoch(loop: TrainLoop, loader, *, epoch: int, global_step: int = 0,
                    carry: dict | None = None) -> EpochResult:
    """Train for one pass over ``loader``, one :func:`train_step` per batch, from run step ``global_step``.

    ``loop.should_stop`` is polled after every step (a signal handler sets it): the epoch then ends early,
    ``interrupted`` set. ``loop.bad_file_log`` receives the unreadable files that the dataset skipped in each
    batch. ``loop.health`` gets every step's triplet accuracy, active fraction and embedding spread; when it
    asks to stop (a collapse with ``--on_collapse stop``) the epoch ends after that step, ``interrupted`` and
    ``collapsed`` set. ``loop.lr_at(step)`` (e.g. :func:`linear_warmup`) sets the learning rate of every
    parameter group before each optimizer step (counted from 1 over the run); None leaves the optimizer's own.

    ``carry`` continues an interrupted epoch: the ``partial`` of the result that stopped it (loss sums over its
    steps, averaged over ranks, and their count), so the epoch's averages are those of an uninterrupted epoch.
    """
    loop.model.train()
    loop.criterion.train()
    tally = _Tally()
    interrupted = False
    start = time.perf_counter()
    bar = progress_bar(loader, desc=f"epoch {epoch}", enabled=loop.progress, leave=False)
    for batch in bar:
        losses, outputs = _take_step(loop, batch, global_step + 1)
        global_step += 1
        _record_step(loop, tally, bar, batch, losses, outputs, global_step)
        if _stop_now(loop):
            interrupted = True
            break
    bar.close()
    return _epoch_result(loop, tally, elapsed=time.perf_counter() - start, global_step=global_step, carry=carry,
                         interrupted=interrupted)


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
    for batch in progress_bar(loader, desc=f"embed {modality}", enabled=progress, leave=False):
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


@dataclass
class EvalResult:
    """What :func:`evaluate` found: ``metrics`` (numbers and the per-class mAP@all), the embeddings when asked
    for (``features``: ``query [Nq, D]``, ``query_labels [Nq]``, ``gallery [Ng, D]``, ``gallery_labels [Ng]``,
    on the CPU) and the items left out as unreadable (``unreadable``: ``{"queries": [(path, reason), ...],
    "gallery": [...]}``)."""

    metrics: dict
    features: dict | None
    unreadable: dict


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
) -> EvalResult:
    """Zero-shot retrieval on the unseen classes: sketches query, photos are the gallery.

    The metrics are those of :func:`utils.metrics.retrieval_metrics` (mAP@all, mAP@200, P@100, P@200,
    the SAKE-convention mAP@200 and per-class mAP@all), plus query/gallery counts, the counts of unreadable
    items and the chance level. ``features`` is None unless ``return_features``.
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
    # Chance level: the fraction of the gallery that is relevant, averaged over queries.
    metrics["chance_mAP"] = chance_level(q_labels, g_labels)
    features = {
        "query": q_feats.cpu(), "query_labels": q_labels.cpu(),
        "gallery": g_feats.cpu(), "gallery_labels": g_labels.cpu(),
    } if return_features else None
    return EvalResult(metrics=metrics, features=features, unreadable={"queries": q_failed, "gallery": g_failed})
