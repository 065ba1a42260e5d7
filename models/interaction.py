"""PMM-int: the sketch-photo interaction head of PuXIM (a transformer decoder matching classifier)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["InteractionHead"]


class InteractionHead(nn.Module):
    """Decides whether a sketch and a photo show the same class.

    The sketch's tokens are the decoder queries, the photo's tokens its memory (keys/values);
    a ``Linear(d_model, 2)`` scores every query token and the scores are averaged over tokens.
    The decoder layers are torch's defaults otherwise (post-norm, ReLU). Everything is
    batch-first: each sample attends only to its own photo (the released code passed batch-first
    tensors to a sequence-first decoder and so attended across the batch).
    """

    def __init__(self, *, d_model: int, nhead: int, num_layers: int, dim_feedforward: int, dropout: float):
        super().__init__()
        layer = nn.TransformerDecoderLayer(
            d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
            activation="relu", batch_first=True, norm_first=False)
        self.decoder = nn.TransformerDecoder(layer, num_layers=num_layers)
        self.classifier = nn.Linear(d_model, 2)

    def forward(self, sketch_tokens: torch.Tensor, photo_tokens: torch.Tensor) -> torch.Tensor:
        if sketch_tokens.shape[0] != photo_tokens.shape[0]:
            raise ValueError(f"sketch and photo batches differ: {sketch_tokens.shape[0]} vs {photo_tokens.shape[0]}")
        x = self.decoder(sketch_tokens, photo_tokens)  # [B, Ls, D]
        return self.classifier(x).mean(dim=1)  # [B, 2]: per-token logits averaged over query tokens
