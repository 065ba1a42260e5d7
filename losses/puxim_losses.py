"""PuXIM's losses: triplet (retrieval), reconstruction (PMM-rec) and matching (PMM-int).

``PuXIMCriterion`` returns a dict of named terms plus their weighted sum ``loss``; its
``weight_dict`` says how each term is weighted (DETR's pattern), so the engine can log every term.
Terms that are not the paper's (the ``tiny`` preset's :class:`SeenClassLoss` and :class:`InstanceLoss`)
are plug-ins the criterion is built with (``extra_losses``): each returns its named terms and carries
their weights.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils import distributed as dist_utils
from utils.config import RunConfig

__all__ = ["TripletLoss", "ReconstructionLoss", "MatchingLoss", "SeenClassLoss", "InstanceLoss", "PuXIMCriterion",
           "build_criterion", "cosine_distance", "symmetric_infonce", "PAPER_TERMS"]

PAPER_TERMS = ("loss_tri", "loss_rec", "loss_int")  # weighted by the configuration's w_tri, w_rec, w_int
INSTANCE_TEMPERATURE = 0.1


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x, y)`` per row: ``[B, D], [B, D] -> [B]``."""
    return 1.0 - F.cosine_similarity(x, y, dim=-1)


class TripletLoss(nn.Module):
    """Triplet margin loss on the (unnormalised) CLS embeddings of sketch, positive, negative.

    ``distance="euclidean"``: ``TripletMarginLoss(margin, p=2)`` (PuXIM, margin 1.0);
    ``distance="cosine"``: ``1 - cos`` distance (the released ``non-mask`` ablation, margin 0.2).
    """

    def __init__(self, *, margin: float, distance: str):
        super().__init__()
        if distance == "euclidean":
            self.loss = nn.TripletMarginLoss(margin=margin, p=2)
        elif distance == "cosine":
            self.loss = nn.TripletMarginWithDistanceLoss(distance_function=cosine_distance, margin=margin)
        else:
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
        self.margin = margin
        self.distance = distance

    def pair_distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss's distance per row, ``[B, D], [B, D] -> [B]`` (for the training-health figures)."""
        if self.distance == "cosine":
            return cosine_distance(x, y)
        return F.pairwise_distance(x, y, p=2)  # TripletMarginLoss's own distance (eps 1e-6)

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return self.loss(anchor, positive, negative)  # scalar, mean over the batch


class ReconstructionLoss(nn.Module):
    """PMM-rec: ``MSE(X, X ⊙ M)`` over every element, gradients through both sides.

    ``X`` ``[2B, N, D]`` are the photo patch tokens, ``M`` ``[2B, N]`` the keep-mask; the value is
    ``mean((1 - M) · X²)``: it pulls the features of irrelevant (masked) patches towards zero.
    """

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape != tokens.shape[:2]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match tokens {tuple(tokens.shape)}")
        return F.mse_loss(tokens, tokens * mask.unsqueeze(-1).to(tokens.dtype))


class MatchingLoss(nn.Module):
    """PMM-int: cross-entropy of the (s, p) / (s, n) match logits, labels 1 / 0."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)


class SeenClassLoss(nn.Module):
    """``loss_cls``: cross-entropy of ``outputs["class_logits"]`` against ``outputs["class_labels"]``.

    A criterion plug-in (``PuXIMCriterion(extra_losses=...)``) for the seen-class head of
    ``models.training_aids.PuXIMWithSeenClassHead`` (the ``tiny`` preset's; not the paper's).
    """

    def __init__(self, weight: float):
        super().__init__()
        self.weight_dict = {"loss_cls": float(weight)}

    def forward(self, outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if "class_logits" not in outputs:
            raise ValueError("the seen-class loss (w_cls > 0) needs outputs['class_logits']: build the model "
                             "with a class head (models.build_model with w_cls and num_seen_classes)")
        return {"loss_cls": F.cross_entropy(outputs["class_logits"], outputs["class_labels"])}


def symmetric_infonce(sketch_emb: torch.Tensor, photo_emb: torch.Tensor,
                      temperature: float = INSTANCE_TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE between matching rows of ``sketch_emb`` ``[B, D]`` and ``photo_emb`` ``[B, D]``.

    Row i of one belongs to row i of the other; every other row of the batch is a negative. Both are
    L2-normalised; logits are cosines over ``temperature``. The value is the mean of the sketch-to-photo
    and photo-to-sketch cross-entropies: open_clip's ``ClipLoss``, which under torch.distributed gathers
    every process's rows with their gradients, so that the negatives are the whole global batch and several
    processes train exactly as one.
    """
    from open_clip.loss import ClipLoss  # here: importing open_clip takes seconds, and only this term needs it

    world_size = dist_utils.get_world_size()
    clip_loss = ClipLoss(gather_with_grad=world_size > 1, rank=dist_utils.get_rank(), world_size=world_size)
    sketches, photos = F.normalize(sketch_emb, dim=-1), F.normalize(photo_emb, dim=-1)  # [B, D] each
    return clip_loss(sketches, photos, 1.0 / temperature)  # logits [B_global, B_global]


class InstanceLoss(nn.Module):
    """``loss_inst``: :func:`symmetric_infonce` of ``outputs["pseudo_sketch_emb"]`` and ``outputs["positive_emb"]``.

    A criterion plug-in for ``models.training_aids.PuXIMWithPseudoSketches`` (the ``tiny`` preset's; not
    the paper's): each positive photo against its own outlines drawn as a sketch. Unlike the class-level
    losses, it asks the encoder to match shapes whatever their class, which is what must carry over to
    unseen classes.
    """

    def __init__(self, weight: float, temperature: float = INSTANCE_TEMPERATURE):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.weight_dict = {"loss_inst": float(weight)}
        self.temperature = float(temperature)

    def forward(self, outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if "pseudo_sketch_emb" not in outputs:
            raise ValueError("the instance loss (w_inst > 0) needs outputs['pseudo_sketch_emb']: build the model "
                             "with pseudo_sketch (models.build_model) and give it batches with batch['pseudo_sketch'] "
                             "(datasets.build_datasets with pseudo_sketch)")
        return {"loss_inst": symmetric_infonce(outputs["pseudo_sketch_emb"], outputs["positive_emb"],
                                               self.temperature)}


class PuXIMCriterion(nn.Module):
    """``L = w_tri L_tri + w_rec L_rec + w_int L_int`` (1, 0.05, 0.1 in the paper) ``+`` the plug-ins' terms.

    ``forward(outputs)`` takes ``PuXIM.forward``'s dict and returns ``loss_tri``, ``loss_rec``,
    ``loss_int``, every term of the ``extra_losses`` and ``loss``, their weighted sum. Without
    reconstruction (``non-mask``) ``loss_rec`` is a detached zero that adds nothing.

    Args:
        triplet: the retrieval term (the paper's: Euclidean, margin 1.0).
        weights: the paper's three weights, ``{"loss_tri", "loss_rec", "loss_int"}`` (:data:`PAPER_TERMS`).
        use_reconstruction: False for the ``non-mask`` variant.
        extra_losses: plug-in modules, each with ``forward(outputs) -> {name: term}`` and ``weight_dict``
            ``{name: weight}`` (e.g. :class:`SeenClassLoss`, :class:`InstanceLoss`).
    """

    def __init__(self, *, triplet: TripletLoss, weights: Dict[str, float], use_reconstruction: bool = True,
                 extra_losses: Sequence[nn.Module] = ()):
        super().__init__()
        if set(weights) != set(PAPER_TERMS):
            raise ValueError(f"weights needs exactly the keys {sorted(PAPER_TERMS)}, got {sorted(weights)}; "
                             f"other terms come from extra_losses")
        self.weight_dict = {k: float(weights[k]) for k in PAPER_TERMS}
        for extra in extra_losses:
            twice = sorted(set(extra.weight_dict) & set(self.weight_dict))
            if twice:
                raise ValueError(f"{type(extra).__name__} names terms the criterion already has: {twice}")
            self.weight_dict.update(extra.weight_dict)
        self.use_reconstruction = use_reconstruction
        self.triplet = triplet
        self.reconstruction = ReconstructionLoss()
        self.matching = MatchingLoss()
        self.extra_losses = nn.ModuleList(extra_losses)

    def forward(self, outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        losses = {
            "loss_tri": self.triplet(outputs["sketch_emb"], outputs["positive_emb"], outputs["negative_emb"]),
            "loss_int": self.matching(outputs["match_logits"], outputs["match_labels"]),
        }
        if self.use_reconstruction:
            losses["loss_rec"] = self.reconstruction(outputs["photo_patch_tokens"], outputs["photo_mask"])
        else:
            losses["loss_rec"] = losses["loss_tri"].new_zeros(())  # detached: contributes nothing
        for extra in self.extra_losses:
            losses.update(extra(outputs))
        losses["loss"] = sum(self.weight_dict[k] * losses[k] for k in self.weight_dict)
        return losses


def build_criterion(config: RunConfig) -> PuXIMCriterion:
    """The criterion of ``config.loss`` (and ``model.variant``: the non-mask variant has no reconstruction term),
    with a plug-in for each extra term whose weight is > 0 (``w_cls``: :class:`SeenClassLoss`, ``w_inst``:
    :class:`InstanceLoss`)."""
    loss = config.loss
    extra_losses = [plug_in(weight) for plug_in, weight in ((SeenClassLoss, loss.w_cls), (InstanceLoss, loss.w_inst))
                    if weight > 0]
    return PuXIMCriterion(triplet=TripletLoss(margin=loss.margin, distance=loss.tri_distance),
                          weights={"loss_tri": loss.w_tri, "loss_rec": loss.w_rec, "loss_int": loss.w_int},
                          use_reconstruction=config.model.variant == "puxim", extra_losses=extra_losses)
