"""PuXIM: encoder + frozen VxL sampler + interaction head, one training step's forward pass."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .encoder import SketchPhotoEncoder
from .interaction import InteractionHead
from .vxl_sampler import VxLSampler

__all__ = ["PuXIM"]


class PuXIM(nn.Module):
    """The PuXIM model.

    ``forward(batch)`` takes a sketch, a positive and a negative photo per sample and returns what
    the losses need (see ``losses.PuXIMCriterion``); ``encode(images, modality)`` gives the
    retrieval embedding (CLS token after the final norm) used at test time. This is the paper's
    model; training aids that are not the paper's are subclasses (``models.training_aids``).

    Args:
        encoder: the shared (or untied) sketch/photo ViT.
        interaction: the matching head (PMM-int).
        sampler: the frozen VxL sampler; may be ``None`` when masks come precomputed in the batch
            (``batch["photo_mask"]`` ``[2B, N]`` for cat(positive, negative), or
            ``batch["positive_mask"]`` and ``batch["negative_mask"]`` ``[B, N]`` each, as
            ``TripletDataset(mask_lookup=...)`` gives them) or when ``use_mask`` is False.
        use_mask: False is the ``non-mask`` ablation: no sampler, masks of ones.
        mask_memory: the interaction head reads the *masked* photo tokens (the paper, Fig. 1e)
            when True; the released code's unmasked tokens when False.
    """

    def __init__(self, *, encoder: SketchPhotoEncoder, interaction: InteractionHead,
                 sampler: Optional[VxLSampler], use_mask: bool = True, mask_memory: bool = True):
        super().__init__()
        if sampler is not None and sampler.num_patches != encoder.num_patches:
            raise ValueError(f"the VxL sampler scores {sampler.num_patches} patches but the encoder has "
                             f"{encoder.num_patches}: their image/patch sizes must give the same grid")
        self.encoder = encoder
        self.interaction = interaction
        self.sampler = sampler if use_mask else None
        self.use_mask = use_mask
        self.mask_memory = mask_memory

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Parameters of the encoder and the interaction head (never the frozen CLIP)."""
        params = list(self.encoder.parameters()) + list(self.interaction.parameters())
        return [p for p in params if p.requires_grad]

    def encode(self, images: torch.Tensor, modality: str = "photo") -> torch.Tensor:
        return self.encoder.embed(images, modality)  # [B, D]

    def _photo_mask(self, batch: dict, photos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Keep-mask ``[2B, N]`` for cat(positive, negative): given, sampled, or all ones."""
        n, num_patches = photos.shape[0], self.encoder.num_patches
        if not self.use_mask:
            return photos.new_ones(n, num_patches, dtype=dtype)
        mask = batch.get("photo_mask")
        if batch.get("positive_mask") is not None or batch.get("negative_mask") is not None:
            # Per-photo masks from a precomputed cache (datasets: TripletDataset(mask_lookup=...)).
            if mask is not None:
                raise ValueError("give either batch['photo_mask'] or batch['positive_mask'] and "
                                 "batch['negative_mask'], not both")
            pos, neg = batch.get("positive_mask"), batch.get("negative_mask")
            if pos is None or neg is None:
                raise ValueError("batch['positive_mask'] and batch['negative_mask'] go together; one is missing")
            if tuple(pos.shape) != (n // 2, num_patches) or tuple(neg.shape) != (n // 2, num_patches):
                raise ValueError(f"batch['positive_mask'] and batch['negative_mask'] must be [B, N] = "
                                 f"{(n // 2, num_patches)}, got {tuple(pos.shape)} and {tuple(neg.shape)}")
            mask = torch.cat([pos, neg])  # [2B, N]
        if mask is not None:
            if tuple(mask.shape) != (n, num_patches):
                raise ValueError(f"batch['photo_mask'] must be [2B, N] = {(n, num_patches)} for "
                                 f"cat(positive, negative), got {tuple(mask.shape)}")
            return mask.to(device=photos.device, dtype=dtype)
        if self.sampler is None:
            raise RuntimeError("PuXIM(use_mask=True) without a sampler needs batch['photo_mask'] (or "
                               "batch['positive_mask'] and batch['negative_mask'])")
        names = list(batch["positive_class"]) + list(batch["negative_class"])
        return self.sampler(photos, names).to(dtype)  # [2B, N], no gradient

    def encode_sketches(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The sketches' tokens ``[B, 1 + N, D]``, and outputs that ``forward`` adds to its own.

        Here the sketches alone and no further outputs; a subclass that encodes more with the sketches
        (``models.training_aids.PuXIMWithPseudoSketches``) overrides it.
        """
        return self.encoder(batch["sketch"], "sketch"), {}

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        sketch, positive, negative = batch["sketch"], batch["positive"], batch["negative"]
        b = sketch.shape[0]
        if positive.shape[0] != b or negative.shape[0] != b:
            raise ValueError(f"sketch/positive/negative batch sizes differ: {b}, {positive.shape[0]}, "
                             f"{negative.shape[0]}")
        photos = torch.cat([positive, negative])  # [2B, 3, H, W]

        sketch_tokens, extra_outputs = self.encode_sketches(batch)  # [B, 1 + N, D]
        photo_tokens = self.encoder(photos, "photo")  # [2B, 1 + N, D]
        patch_tokens = photo_tokens[:, 1:]  # [2B, N, D]
        mask = self._photo_mask(batch, photos, photo_tokens.dtype)  # [2B, N]

        # The interaction memory is X ⊙ M, the very tensor PMM-rec pulls X towards (paper, Fig. 1e:
        # masked photo features as key/value); the CLS token is kept as it is.
        if self.mask_memory:
            memory = torch.cat([photo_tokens[:, :1], patch_tokens * mask.unsqueeze(-1)], dim=1)
        else:
            memory = photo_tokens  # the released code's choice
        queries = sketch_tokens.repeat(2, 1, 1)  # [2B, 1 + N, D]: the same sketch for (s, p) and (s, n)
        match_logits = self.interaction(queries, memory)  # [2B, 2]
        # [2B]: 1 for (s, p), 0 for (s, n); made on the device (a host copy would sync the stream)
        match_labels = (torch.arange(2 * b, device=sketch.device) < b).long()

        outputs = {
            "sketch_emb": sketch_tokens[:, 0],  # [B, D]
            "positive_emb": photo_tokens[:b, 0],  # [B, D]
            "negative_emb": photo_tokens[b:, 0],  # [B, D]
            "photo_patch_tokens": patch_tokens,  # [2B, N, D]
            "photo_mask": mask,  # [2B, N]
            "match_logits": match_logits,  # [2B, 2]
            "match_labels": match_labels,  # [2B]
        }
        outputs.update(extra_outputs)
        return outputs
