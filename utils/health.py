"""Training health: triplet accuracy, active triplets, embedding spread, and a collapse alarm.

A triplet-loss run can fail quietly: every embedding moves to (nearly) the same point, the loss sits
at the margin, and the unseen-class mAP stays at chance while the log looks calm. ``HealthMonitor``
watches three figures of every training batch and says so, once, when that happens (or when the
embeddings stay apart but the triplets are not learnt: the same rule, its second half; the alarm then
says NOT LEARNING instead of COLLAPSED):

* ``triplet_acc`` — fraction of triplets with d(s, p) < d(s, n) (0.5 is a coin toss);
* ``active_frac`` — fraction of triplets with a non-zero loss (d(s, p) - d(s, n) + margin > 0);
* ``emb_spread`` — how far the batch's embeddings lie from their mean, relative to their size:
  ``sqrt(mean ||e_i - ē||²) / sqrt(mean ||e_i||²)``, computed per modality (sketches; photos) and
  averaged. 1 for embeddings scattered around the origin, 0 when they all coincide.

A *collapse* is a stretch of at least ``patience`` optimizer steps in which every logged window shows
either a spread below ``min_spread``, or a triplet loss within ``margin_tol`` (relative) of the margin
together with a triplet accuracy within 0.1 of 0.5. At random initialisation the loss lies *above*
the margin (the distances differ a lot), so a healthy start does not look like a collapse.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from utils.config import ON_COLLAPSE

__all__ = ["HealthMonitor", "CollapseRule", "triplet_health", "embedding_spread", "ON_COLLAPSE", "ALARM_COLLAPSED",
           "ALARM_NOT_LEARNING", "alarm_in"]

# The alarm's words for its two cases (tools.learning_matrix reads train.log for them).
ALARM_COLLAPSED = "COLLAPSED"
ALARM_NOT_LEARNING = "NOT LEARNING"
log = logging.getLogger("train")


def embedding_spread(emb: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean ||e_i - ē||²) / sqrt(mean ||e_i||²)`` of ``[N, D]`` embeddings (a 0-dim tensor)."""
    centred = emb - emb.mean(0, keepdim=True)  # [N, D]
    return centred.pow(2).sum(1).mean().sqrt() / emb.pow(2).sum(1).mean().sqrt().clamp_min(1e-12)


@torch.no_grad()
def triplet_health(outputs: dict, distance, margin: float) -> dict[str, torch.Tensor]:
    """Health figures of one batch from ``PuXIM.forward``'s outputs, as 0-dim tensors on the outputs' device.

    ``distance(x, y) -> [B]`` is the triplet loss's distance (Euclidean or 1 - cos).
    """
    s, p, n = (outputs[k].detach().float() for k in ("sketch_emb", "positive_emb", "negative_emb"))  # [B, D]
    d_sp, d_sn = distance(s, p), distance(s, n)  # [B]
    return {
        "triplet_acc": (d_sp < d_sn).float().mean(),
        "active_frac": (d_sp - d_sn + margin > 0).float().mean(),
        "emb_spread": (embedding_spread(s) + embedding_spread(torch.cat([p, n]))) / 2,
    }


@dataclass
class CollapseRule:
    """When a window of steps counts as collapsed (see the module doc)."""

    margin: float
    patience: int  # optimizer steps
    min_spread: float = 0.02
    margin_tol: float = 0.02
    acc_tol: float = 0.1

    def collapsed(self, w: dict) -> bool:
        pinned = (abs(w["loss_tri"] - self.margin) <= self.margin_tol * self.margin
                  and abs(w["triplet_acc"] - 0.5) <= self.acc_tol)
        return w["emb_spread"] < self.min_spread or pinned


def alarm_in(text: str) -> str | None:
    """Which alarm a train.log's ``text`` holds: ``"collapsed"``, ``"not learning"``, or None."""
    if f"has {ALARM_COLLAPSED}" in text:
        return "collapsed"
    if f"is {ALARM_NOT_LEARNING}" in text:
        return "not learning"
    return None


class HealthMonitor:
    """Collects per-step health figures; writes ``health/*`` every ``log_every`` steps; raises the alarm.

    ``update(step, losses, outputs)`` is called once per optimizer step with the criterion's terms and
    the model's outputs (``distance`` and ``margin`` are the triplet loss's); every ``log_every`` steps the
    window's means go to TensorBoard and through the collapse rule. The alarm is logged once per run
    (console and train.log). With ``on_collapse="stop"`` :attr:`stop_requested` turns True, so the
    loop stops after this step; the caller saves a checkpoint and exits 2.
    ``epoch_means()`` gives the current epoch's means for log.txt and resets them.
    """

    def __init__(self, *, distance, margin: float, on_collapse: str, log_every: int, patience: int,
                 exp_logger=None, min_spread: float = 0.02):
        if on_collapse not in ON_COLLAPSE:
            raise ValueError(f"--on_collapse must be one of {ON_COLLAPSE}, got {on_collapse!r}")
        self.distance = distance  # the triplet loss's distance, [B, D], [B, D] -> [B]
        self.rule = CollapseRule(margin=margin, patience=patience, min_spread=min_spread)
        self.on_collapse = on_collapse
        self.log_every = max(1, log_every)
        self.exp_logger = exp_logger
        self.alarmed = False
        self.stop_requested = False
        self.collapsed_since: int | None = None  # first step of the current collapsed stretch
        self._window: dict[str, float] = {}
        self._window_steps = 0
        self._epoch: dict[str, float] = {}
        self._epoch_steps = 0

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run logs the same figures and alarms at most once."""
        return {"alarmed": self.alarmed, "collapsed_since": self.collapsed_since,
                "window": dict(self._window), "window_steps": self._window_steps,
                "epoch": dict(self._epoch), "epoch_steps": self._epoch_steps}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.alarmed = bool(state.get("alarmed", False))
        self.collapsed_since = state.get("collapsed_since")
        self._window, self._window_steps = dict(state.get("window", {})), int(state.get("window_steps", 0))
        self._epoch, self._epoch_steps = dict(state.get("epoch", {})), int(state.get("epoch_steps", 0))

    def update(self, step: int, losses: dict, outputs: dict) -> None:
        # One host read per step, as the loss logging makes: the figures are summed on the host.
        values = {k: float(v) for k, v in triplet_health(outputs, self.distance, self.rule.margin).items()}
        values["loss_tri"] = float(losses["loss_tri"].detach())
        for store in (self._window, self._epoch):
            for k, v in values.items():
                store[k] = store.get(k, 0.0) + v
        self._window_steps += 1
        self._epoch_steps += 1
        if step % self.log_every == 0:
            self._close_window(step)

    def _close_window(self, step: int) -> None:
        w = {k: v / self._window_steps for k, v in self._window.items()}
        self._window, self._window_steps = {}, 0
        if self.exp_logger is not None:
            self.exp_logger.scalars({k: w[k] for k in ("triplet_acc", "active_frac", "emb_spread")}, step,
                                    prefix="health/")
        if not self.rule.collapsed(w):
            self.collapsed_since = None
            return
        if self.collapsed_since is None:
            self.collapsed_since = step - self.log_every + 1
        if step - self.collapsed_since + 1 >= self.rule.patience and not self.alarmed:
            self.alarmed = True
            self._alarm(step, w)
            self.stop_requested = self.on_collapse == "stop"

    def _alarm(self, step: int, w: dict) -> None:
        # Two failures share the rule and the remedies; the message names the one this window shows.
        if w["emb_spread"] < self.rule.min_spread:
            what = f"training has {ALARM_COLLAPSED} (every embedding at nearly one point)"
        else:
            what = (f"training is {ALARM_NOT_LEARNING} (the embeddings differ, but not by what the triplets ask: "
                    f"the triplet loss sits at the margin and its accuracy at chance)")
        log.warning(
            "%s since step %d (now step %d): embedding spread %.4f (0 = all embeddings "
            "equal), triplet loss %.4f against the margin %.4g, triplet accuracy %.3f (0.5 = chance), active "
            "triplets %.2f. Unless the run leaves this state by itself (watch health/triplet_acc and "
            "health/emb_spread in TensorBoard), the unseen-class mAP stays near chance. "
            "Try: a lower --lr; pretrained "
            "--vit_weights for b16; for a model trained from scratch, the tiny preset's settings (--stem_norm "
            "batch, --dropout 0, --warmup_steps 50) and a longer run; check that sketches and photos of a class "
            "match (python -m datasets.prepare --check ROOT ... --verify_images). %s",
            what, self.collapsed_since, step, w["emb_spread"], w["loss_tri"], self.rule.margin, w["triplet_acc"],
            w["active_frac"],
            "--on_collapse stop: saving a checkpoint and stopping." if self.on_collapse == "stop"
            else "Training goes on (--on_collapse stop ends such a run).")

    def epoch_means(self) -> dict[str, float]:
        means = {k: v / self._epoch_steps for k, v in self._epoch.items() if k != "loss_tri"} \
            if self._epoch_steps else {}
        self._epoch, self._epoch_steps = {}, 0
        return means
