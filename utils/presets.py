"""The presets (``--arch``): one typed configuration per preset, the one place their values live.

A :class:`Preset` bundles what ``--arch NAME`` decides: the encoder (:class:`EncoderConfig`, read by
``models.build_encoder``), the PMM interaction decoder (:class:`InteractionConfig`, ``models.build_model``),
the VxL sampler's CLIP (:class:`SamplerConfig`, ``models.vxl_sampler.build_vxl_sampler`` and the
mask-cache key of ``models.vxl_cache``) and the training recipe (:class:`RecipeConfig`, the defaults
``train.resolve_args`` gives the flags left unset). train.py's ``--arch`` choices and its help text are
generated from :data:`PRESETS`, so adding a preset is one entry there.

Kept light to import (dataclasses only, no torch): train.py builds its parser from it before it
imports the models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from utils.config import DataConfig, LossConfig, ModelConfig, OptimConfig, RunConfig

__all__ = ["CLIP_MODEL_NAME", "INPUT_NORMS", "check_input_norm", "EncoderConfig", "InteractionConfig", "SamplerConfig", "RecipeConfig", "Preset",
           "PRESETS", "SAMPLER_OPTIONS", "get_preset", "default_arch", "preset_values", "sampler_options"]

# OpenAI's ViT-B/16 was trained with QuickGELU; open_clip's plain "ViT-B-16" is GELU (wrong here).
CLIP_MODEL_NAME = "ViT-B-16-quickgelu"

# What the encoder standardises per image before its ViT (EncoderConfig.input_norm): nothing (the paper's), or
# each photo (models.encoder.standardize_images).
INPUT_NORMS = ("none", "photo")


def check_input_norm(input_norm: str) -> str:
    """``input_norm`` when it is one of :data:`INPUT_NORMS`; ValueError naming them otherwise."""
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
    return input_norm


@dataclass(frozen=True)
class EncoderConfig:
    """``models.encoder.SketchPhotoEncoder``'s keyword arguments (``dataclasses.asdict`` gives them)."""
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    dropout: float  # train.py --dropout overrides it
    stem_channels: Tuple[int, int, int]
    stem_norm: str  # "none" | "batch"; train.py --stem_norm overrides it
    ln_eps: float = 1e-6  # timm's LayerNorm eps; the released ViT used torch's 1e-5 (train.py --ln_eps)
    input_norm: str = "none"  # "none" (the paper's) | "photo": each photo standardised on its own (--input_norm)


@dataclass(frozen=True)
class InteractionConfig:
    """``models.interaction.InteractionHead``'s keyword arguments (the PMM-int decoder)."""
    d_model: int
    nhead: int
    num_layers: int
    dim_feedforward: int
    dropout: float  # train.py --dropout overrides it


@dataclass(frozen=True)
class SamplerConfig:
    """The VxL sampler's CLIP, and its options.

    ``clip_model``: open_clip's name of the CLIP architecture whose OpenAI-format weights ``--clip_weights``
    loads, and of its tokenizer. ``random_clip``: an ``open_clip.CLIP`` config; when set, the preset needs
    no ``--clip_weights``: a seeded random CLIP of this config stands in (and ``--clip_weights`` loads a
    checkpoint of this config, not of ``clip_model``'s). Read-only: copy it before changing it.
    ``surgery_depth``: the last visual blocks with the CLIP Surgery path.
    ``keep_ratio``, ``prompt``, ``vxl_norm``, ``clip_input_norm`` (:data:`SAMPLER_OPTIONS`, train.py's
    flags of those names): the defaults of the flags left unset (:func:`sampler_options`), and of
    ``VxLSampler``'s keywords. The released code's choices: keep 30% of the patches, the bare class name
    as prompt, CLIP Surgery features L2-normalised over the token axis, and CLIP fed the encoder's
    0.5/0.5-normalised photo.
    """
    clip_model: str = CLIP_MODEL_NAME
    random_clip: Optional[dict] = field(default=None, hash=False)  # a dict: left out of the hash
    surgery_depth: int = 6
    keep_ratio: float = 0.3
    prompt: str = "{}"
    vxl_norm: str = "token"  # "token" | "channel"
    clip_input_norm: str = "encoder"  # "encoder" | "clip"


SAMPLER_OPTIONS = ("keep_ratio", "prompt", "vxl_norm", "clip_input_norm")
"""The sampler settings that are also flags of train.py and the mask tools (same names)."""


@dataclass(frozen=True)
class RecipeConfig:
    """train.py's defaults for the flags of the same names left unset (``dataclasses.asdict`` gives them)."""
    lr: float
    weight_decay: float
    batch_size: int  # global, over all processes
    epoch: int
    datasetLen: int  # sampled triplets per epoch
    image_size: int
    tri_distance: Optional[str] = None  # None: by --variant (losses.default_distance)
    w_cls: float = 0.0  # weight of the seen-class cross-entropy; 0: none (the paper's)
    w_inst: float = 0.0  # weight of the pseudo-sketch instance loss (losses.InstanceLoss); 0: none (the paper's)
    warmup_steps: int = 0  # linear learning-rate warm-up over the first optimizer steps; 0: constant (the paper's)
    augment: str = "none"  # training-image augmentation (datasets.transforms.AUGMENTATIONS); none: the paper's
    vit_weights: Optional[str] = None  # pretrained ViT (a timm tag or a file); None: from scratch


@dataclass(frozen=True)
class Preset:
    name: str
    encoder: EncoderConfig
    interaction: InteractionConfig
    sampler: SamplerConfig
    recipe: RecipeConfig
    description: str = ""


PRESETS: Dict[str, Preset] = {
    "b16": Preset(
        name="b16",
        description="the paper's ViT-B/16, OpenAI's CLIP ViT-B/16 sampler, the released recipe",
        encoder=EncoderConfig(
            img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
            dropout=0.1, stem_channels=(64, 128, 256), stem_norm="none", ln_eps=1e-6,
        ),
        interaction=InteractionConfig(d_model=768, nhead=4, num_layers=4, dim_feedforward=1024, dropout=0.1),
        sampler=SamplerConfig(clip_model=CLIP_MODEL_NAME, surgery_depth=6),
        # The released training schedule (README "Training"): Adam 1e-5, weight decay 1e-3, 50 epochs of
        # 5,000 triplets in batches of 2, i.e. 2,500 updates per epoch and 125,000 in all.
        recipe=RecipeConfig(lr=1e-5, weight_decay=1e-3, batch_size=2, epoch=50, datasetLen=5000, image_size=224,
                            tri_distance=None, w_cls=0.0, vit_weights="vit_base_patch16_224.orig_in21k"),
    ),
    "tiny": Preset(
        name="tiny",
        description="a small ViT trained from scratch on a CPU, with a random tiny CLIP",
        # The CPU preset adds BatchNorm after each stem conv (a deviation, see models.encoder.ConvStemPatchEmbed):
        # trained from scratch, the tiny ViT with the paper's bare stem collapses under the triplet loss (all
        # embeddings equal, triplet accuracy 0.5) within ~40 steps at every learning rate tried. No dropout:
        # a few hundred from-scratch steps underfit, and dropout 0.1 slowed learning about 2x (README).
        # Each photo standardised on its own (input_norm): the class is in the shape, and the contrast of a
        # photo's shape against its background varies from photo to photo, which the BatchNorms (statistics
        # of the whole batch) do not undo; the small CNN with the same input stopped sitting at chance on
        # low-contrast photos (README, "Does it learn beyond...").
        encoder=EncoderConfig(
            img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0,
            dropout=0.0, stem_channels=(16, 32, 64), stem_norm="batch", ln_eps=1e-6, input_norm="photo",
        ),
        interaction=InteractionConfig(d_model=192, nhead=4, num_layers=2, dim_feedforward=256,
                                      dropout=0.0),  # no dropout: see the encoder
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
        # A cosine triplet loss and a seen-class cross-entropy (models.SeenClassHead): with the paper's
        # Euclidean triplet alone it fits the seen triplets and stays near chance on unseen classes of most
        # benchmarks. The instance loss (each positive photo against its own outlines drawn as a sketch)
        # teaches a match that does not depend on the seen classes: on the learning matrix it raised unseen
        # mAP on every benchmark it moved, and lowered none (README, "Does it learn beyond...").
        # A 50-step warm-up: from a constant 5e-4, the first ~20 Adam steps squeeze the embeddings together
        # (spread 0.33 -> 0.05) and some benchmarks then sit at chance for 100-200 of their 500 steps.
        # Random crops and flips: a from-scratch model with 6-40 seen classes fits them (triplet accuracy
        # 0.98) long before it has learnt what transfers to unseen ones.
        recipe=RecipeConfig(lr=5e-4, weight_decay=1e-4, batch_size=32, epoch=10, datasetLen=1600, image_size=64,
                            tri_distance="cosine", w_cls=1.0, w_inst=1.0, warmup_steps=50, augment="crop_flip",
                            vit_weights=None),
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError naming the known ones otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise ValueError(f"unknown preset (--arch) {name!r}; choose one of {sorted(PRESETS)}") from None


def default_arch(synthetic: bool) -> str:
    """The preset when ``--arch`` is not given: ``tiny`` on the synthetic benchmark (no ``--data_path``;
    CPU-friendly), else ``b16``, the paper's."""
    return "tiny" if synthetic else "b16"


def sampler_options(args, arch: str) -> dict:
    """:data:`SAMPLER_OPTIONS` for a run: each from ``args`` (a namespace or a dict, e.g. a checkpoint's saved
    args) where set and not None, else from preset ``arch``'s :class:`SamplerConfig`."""
    sampler = get_preset(arch).sampler
    get = args.get if isinstance(args, dict) else (lambda name: getattr(args, name, None))
    return {name: getattr(sampler, name) if get(name) is None else get(name) for name in SAMPLER_OPTIONS}


def preset_values(get: Callable[[Preset], object]) -> str:
    """One setting of every preset, for help texts: ``preset_values(lambda p: p.recipe.lr)`` is
    ``"b16: 1e-05, tiny: 0.0005"``."""
    return ", ".join(f"{name}: {get(p)}" for name, p in PRESETS.items())


def _tiny_run() -> RunConfig:
    # Why each aid (README, "Does it learn beyond..."): the stem BatchNorm keeps the from-scratch tiny ViT from
    # collapsing under the triplet loss (all embeddings equal within ~40 steps at every learning rate tried);
    # no dropout, as a few hundred from-scratch steps underfit; each photo standardised on its own, since the
    # contrast of a shape against its background varies from photo to photo and batch statistics do not undo
    # it. The cosine triplet and the seen-class cross-entropy: the paper's Euclidean triplet alone fits the
    # seen triplets and stays near chance on unseen classes. The instance loss (each positive photo against its
    # own outlines drawn as a sketch) teaches a match that does not depend on the seen classes. The warm-up:
    # from a constant 5e-4 the first Adam steps squeeze the embeddings together. Crops and flips: a
    # from-scratch model fits a few seen classes long before it learns what transfers to unseen ones.
    return RunConfig(
        data=DataConfig(datasetLen=1600, image_size=64, augment="crop_flip", pseudo_sketch=True),
        model=ModelConfig(arch="tiny", vit_weights=None, dropout=0.0, stem_norm="batch", input_norm="photo"),
        loss=LossConfig(tri_distance="cosine", margin=0.2, w_cls=1.0, w_inst=1.0),
        optim=OptimConfig(lr=5e-4, weight_decay=1e-4, batch_size=32, epoch=10, warmup_steps=50),
    )


# The complete run configuration of each preset. b16's is the settings' defaults, the paper's recipe: Adam 1e-5,
# weight decay 1e-3, 50 epochs of 5,000 triplets in batches of 2 (2,500 updates per epoch, 125,000 in all), the
# Euclidean triplet with margin 1.0.
RUN_PRESETS: Dict[str, RunConfig] = {"b16": RunConfig(), "tiny": _tiny_run()}


def run_preset(name: str) -> RunConfig:
    """The complete run configuration of preset ``name``; ValueError naming the known ones otherwise."""
    try:
        return RUN_PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown preset (--arch) {name!r}; choose one of {sorted(RUN_PRESETS)}") from None
