"""PuXIM with the ``tiny`` preset's model-side training aids, which are not the paper's.

A small ViT trained from scratch on a CPU budget needs help the paper's pretrained ViT-B/16 does not
(``utils.presets``, the ``tiny`` preset, says which and why). Each aid here is a subclass of
:class:`~models.puxim.PuXIM` that adds outputs for a loss of ``losses`` (a plug-in of the criterion):

* :class:`PuXIMWithPseudoSketches`: the positive photos' pseudo-sketches (``batch["pseudo_sketch"]``, the
  photo's outlines drawn as a sketch) encoded as sketches, for ``losses.InstanceLoss``;
* :class:`PuXIMWithSeenClassHead`: a seen-class classifier on the CLS embeddings, for
  ``losses.SeenClassLoss``;
* :class:`PuXIMWithTrainingAids`: both (the ``tiny`` preset).

``models.build_model`` picks the class (:func:`puxim_class`); the paper's ``PuXIM`` has none of them.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from .class_head import SeenClassHead
from .puxim import PuXIM

__all__ = ["PuXIMWithPseudoSketches", "PuXIMWithSeenClassHead", "PuXIMWithTrainingAids", "puxim_class"]


class PuXIMWithPseudoSketches(PuXIM):
    """PuXIM that also encodes ``batch["pseudo_sketch"]`` ``[B, 3, H, W]`` and returns ``pseudo_sketch_emb`` ``[B, D]``.

    Sketches and pseudo-sketches go through the encoder in one call, so that in training the sketch
    BatchNorm statistics of the ``tiny`` stem are those of real and pseudo-sketches together.
    """

    def encode_sketches(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        pseudo = batch.get("pseudo_sketch")
        if pseudo is None:
            raise ValueError("PuXIM with pseudo-sketches needs batch['pseudo_sketch'] (the positive photos' outlines: "
                             "datasets.build_datasets with pseudo_sketch, or datasets.sampling.PseudoSketches)")
        b = batch["sketch"].shape[0]
        tokens = self.encoder(torch.cat([batch["sketch"], pseudo]), "sketch")  # [2B, 1 + N, D]
        sketch_tokens, pseudo_tokens = tokens[:b], tokens[b:]  # [B, 1 + N, D] each
        return sketch_tokens, {"pseudo_sketch_emb": pseudo_tokens[:, 0]}  # [B, D]


class PuXIMWithSeenClassHead(PuXIM):
    """PuXIM with a seen-class classifier on the CLS embeddings of sketch, positive and negative.

    ``forward`` also returns ``class_logits`` ``[3B, C]`` and ``class_labels`` ``[3B]`` (sketch, positive,
    negative); the batch must carry ``positive_label`` and ``negative_label`` (``TripletDataset`` gives them).
    """

    def __init__(self, *, class_head: SeenClassHead, **kwargs):
        super().__init__(**kwargs)
        self.class_head = class_head

    def trainable_parameters(self) -> List[nn.Parameter]:
        return super().trainable_parameters() + [p for p in self.class_head.parameters() if p.requires_grad]

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if batch.get("positive_label") is None or batch.get("negative_label") is None:
            raise ValueError("PuXIM with a class head needs batch['positive_label'] and batch['negative_label'] "
                             "(the seen-class indices TripletDataset gives)")
        outputs = super().forward(batch)
        device = outputs["sketch_emb"].device
        pos_label = torch.as_tensor(batch["positive_label"], device=device)  # [B]
        neg_label = torch.as_tensor(batch["negative_label"], device=device)  # [B]
        embeddings = torch.cat([outputs["sketch_emb"], outputs["positive_emb"], outputs["negative_emb"]])  # [3B, D]
        outputs["class_logits"] = self.class_head(embeddings)  # [3B, C]
        outputs["class_labels"] = torch.cat([pos_label, pos_label, neg_label]).long()  # [3B]
        return outputs


class PuXIMWithTrainingAids(PuXIMWithPseudoSketches, PuXIMWithSeenClassHead):
    """PuXIM with pseudo-sketches and a seen-class head: the ``tiny`` preset's model."""


_CLASSES = {  # (pseudo_sketches, seen_class_head) -> class
    (False, False): PuXIM,
    (True, False): PuXIMWithPseudoSketches,
    (False, True): PuXIMWithSeenClassHead,
    (True, True): PuXIMWithTrainingAids,
}


def puxim_class(*, pseudo_sketches: bool, seen_class_head: bool) -> type:
    """The PuXIM class with the chosen aids; with none, the paper's :class:`PuXIM` itself."""
    return _CLASSES[(bool(pseudo_sketches), bool(seen_class_head))]
