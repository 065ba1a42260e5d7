"""A cosine classifier over the seen training classes (the ``tiny`` preset's auxiliary loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SeenClassHead"]


class SeenClassHead(nn.Module):
    """``logits = scale · cos(embedding, w_c)`` for each seen class ``c``: ``[B, D] -> [B, C]``.

    Trained from scratch, a small ViT under the triplet loss alone fits the seen triplets but its CLS
    embeddings stay near chance on unseen classes (docs/tiny_preset.md, "What it adds, and why");
    a cross-entropy over the seen classes on the same L2-normalised embeddings, as the small-CNN
    yardstick (``tools.cnn_reference``) uses, gives every class its own direction. Cosine logits keep the
    head from pushing the embedding norm instead of its direction; ``scale`` 16 is the usual temperature
    of normalised softmax (at scale 1 the logits span only [-1, 1] and the loss cannot fall).
    """

    def __init__(self, *, embed_dim: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a seen-class head needs at least 2 classes, got {num_classes}")
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.02)  # [C, D]
        self.scale = float(scale)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T  # [B, C]
