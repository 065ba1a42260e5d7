"""The presets (``--arch``): what each builds, and the complete run configuration it trains with.

:data:`ARCHITECTURES` holds the sizes of the networks ``models`` builds for a preset, as data (as open_clip's
model configs): the encoder (:class:`EncoderConfig`, ``models.build_encoder``), the PMM-int decoder
(:class:`InteractionConfig`, ``models.build_model``) and the VxL sampler's CLIP (:class:`SamplerConfig`,
``models.vxl_sampler.build_vxl_sampler`` and the mask-cache key of ``models.vxl_cache``). :data:`PRESETS` holds
each preset's :class:`utils.config.RunConfig`: every setting, nothing left to fill. Adding a preset is one entry
in each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from utils.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig

__all__ = ["CLIP_MODEL_NAME", "VitSizes", "EncoderConfig", "InteractionConfig", "SamplerConfig", "Architecture",
           "ARCHITECTURES", "PRESETS", "get_architecture", "get_preset"]

# OpenAI's ViT-B/16 was trained with QuickGELU; open_clip's plain "ViT-B-16" is GELU (wrong here).
CLIP_MODEL_NAME = "ViT-B-16-quickgelu"


@dataclass(frozen=True)
class VitSizes:
    """A ViT's sizes: timm ``VisionTransformer``'s keywords of these names."""
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float


@dataclass(frozen=True)
class EncoderConfig(VitSizes):
    """The sketch/photo ViT's sizes and stem (``models.encoder.SketchPhotoEncoder``'s keywords with the run's
    settings)."""
    stem_channels: Tuple[int, int, int]


@dataclass(frozen=True)
class InteractionConfig:
    """The PMM-int decoder's sizes (``models.interaction.InteractionHead``'s keywords with the run's dropout)."""
    d_model: int
    nhead: int
    num_layers: int
    dim_feedforward: int


@dataclass(frozen=True)
class SamplerConfig:
    """The VxL sampler's CLIP.

    ``clip_model``: open_clip's name of the CLIP architecture whose OpenAI-format weights ``--clip_weights``
    loads, and of its tokenizer. ``random_clip``: an ``open_clip.CLIP`` config; when set, the preset needs
    no ``--clip_weights``: a seeded random CLIP of this config stands in (and ``--clip_weights`` loads a
    checkpoint of this config, not of ``clip_model``'s). Read-only: copy it before changing it.
    ``surgery_depth``: the last visual blocks with the CLIP Surgery path.
    """
    clip_model: str = CLIP_MODEL_NAME
    random_clip: Optional[dict] = field(default=None, hash=False)  # a dict: left out of the hash
    surgery_depth: int = 6


@dataclass(frozen=True)
class Architecture:
    name: str
    encoder: EncoderConfig
    interaction: InteractionConfig
    sampler: SamplerConfig
    description: str = ""


ARCHITECTURES: Dict[str, Architecture] = {
    "b16": Architecture(
        name="b16",
        description="the paper's ViT-B/16, OpenAI's CLIP ViT-B/16 sampler",
        encoder=EncoderConfig(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                              stem_channels=(64, 128, 256)),
        interaction=InteractionConfig(d_model=768, nhead=4, num_layers=4, dim_feedforward=1024),
        sampler=SamplerConfig(clip_model=CLIP_MODEL_NAME, surgery_depth=6),
    ),
    "tiny": Architecture(
        name="tiny",
        description="a small ViT trained from scratch on a CPU, with a random tiny CLIP",
        encoder=EncoderConfig(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
                              stem_channels=(16, 32, 64)),
        interaction=InteractionConfig(d_model=192, nhead=4, num_layers=2, dim_feedforward=256),
        # A tiny random CLIP for CPU tests. Head width 64 (vision 2 heads, text 1) follows OpenAI's
        # convention, so open_clip's OpenAI loader infers the same architecture; the text side keeps
        # context 77 / vocab 49408 so open_clip's shipped BPE tokenizer (CLIP_MODEL_NAME's) works offline.
        sampler=SamplerConfig(
            clip_model=CLIP_MODEL_NAME, surgery_depth=2,
            random_clip=dict(
                embed_dim=64,
                quick_gelu=True,
                vision_cfg=dict(image_size=64, patch_size=8, width=128, layers=4, head_width=64, mlp_ratio=4.0),
                text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
            ),
        ),
    ),
}


def _tiny_run() -> RunConfig:
    # Why each aid (docs/tiny_preset.md; measured in docs/results/learning_matrix.md and synthetic.md): the stem
    # BatchNorm keeps the from-scratch ViT from collapsing under the triplet loss (all embeddings equal); no
    # dropout, as a few hundred from-scratch steps underfit; each photo standardised on its own, since the contrast
    # of a shape against its background varies from photo to photo and batch statistics do not undo it; the cosine
    # triplet and the seen-class cross-entropy, since the paper's Euclidean triplet alone fits the seen triplets and
    # stays near chance on unseen classes; the instance loss (each positive photo against its own outlines drawn as
    # a sketch), a match that does not depend on the seen classes; the warm-up, since a constant rate's first Adam
    # steps squeeze the embeddings together; crops and flips, since a from-scratch model fits a few seen classes
    # long before it learns what transfers to unseen ones.
    return RunConfig(
        data=DataConfig(datasetLen=1600, image_size=64, augment="crop_flip", pseudo_sketch=True),
        # vit_arch None: timm's plain ViT at the tiny sizes; no checkpoint to take another architecture from.
        model=ModelConfig(arch="tiny", vit_weights=None, vit_arch=None, dropout=0.0, stem_norm="batch",
                          input_norm="photo"),
        loss=LossConfig(tri_distance="cosine", margin=0.2, w_cls=1.0, w_inst=1.0),
        optim=OptimConfig(lr=5e-4, weight_decay=1e-4, batch_size=32, epoch=10, warmup_steps=50),
    )



# The complete run configuration of each preset. b16's is the settings' defaults, the paper's recipe: Adam 1e-5,
# weight decay 1e-3, 50 epochs of 5,000 triplets in batches of 2 (2,500 updates per epoch, 125,000 in all), the
# Euclidean triplet with margin 1.0, dropout 0.1, timm's LayerNorm eps.
PRESETS: Dict[str, RunConfig] = {"b16": RunConfig(), "tiny": _tiny_run()}


def _known(table: dict, name: str):
    try:
        return table[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise ValueError(f"unknown preset (--arch) {name!r}; choose one of {sorted(table)}") from None


def get_preset(name: str) -> RunConfig:
    """The complete run configuration of preset ``name``; ValueError naming the known ones otherwise."""
    return _known(PRESETS, name)


def get_architecture(name: str) -> Architecture:
    """The network sizes of preset ``name``; ValueError naming the known ones otherwise."""
    return _known(ARCHITECTURES, name)
