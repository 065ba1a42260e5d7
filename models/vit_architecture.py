"""The architecture of a starting checkpoint: what the encoder's ViT takes from timm's model of a tag.

ViT-B/16 checkpoints differ in more than their weights: CLIP's image tower has a LayerNorm before the first block
(``norm_pre``) and no patch-embedding bias, OpenAI's was trained with QuickGELU, timm's ViTs use LayerNorm eps 1e-6
and CLIP's 1e-5. Loaded into another architecture, the same weights compute another function. So the encoder is
built with the architecture of its starting point: :func:`read_vit_architecture` builds timm's own model of a tag
on the meta device (no weights, no download) and reads these off its modules; ``models.encoder`` then builds the
ViT with them and PuXIM's conv stem. A checkpoint file states no architecture: ``--vit_arch`` names the timm model
it belongs to, and :func:`fitting_starting_points` says which supported ones have its key layout.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import asdict, dataclass
from typing import Iterable, List

import torch
from torch import nn

from utils.config import vit_arch_name
from utils.presets import VitSizes, get_architecture

from .weight_errors import WeightMismatchError

_logger = logging.getLogger(__name__)

__all__ = ["STARTING_POINTS", "VitArchitecture", "VitArchitectureError", "read_vit_architecture",
           "check_fits_preset", "what_fits", "fitting_starting_points", "timm_state_dict_shapes"]

# The supported starting points (tests/test_starting_points.py, docs/starting_points.md): timm tag -> what its
# weights were trained on.
STARTING_POINTS = {
    "vit_base_patch16_224.orig_in21k": "ImageNet-21k, supervised (Google's original ViT release)",
    "vit_base_patch16_224.augreg_in21k": "ImageNet-21k, supervised, with AugReg (augmentation and regularisation)",
    "vit_base_patch16_224.sam_in1k": "ImageNet-1k, supervised, with the SAM optimiser",
    "vit_base_patch16_clip_quickgelu_224.openai": "OpenAI's CLIP image tower (400M image-text pairs), QuickGELU",
    "vit_base_patch16_clip_224.laion2b": "LAION-2B CLIP image tower (open_clip), GELU",
    "vit_base_patch16_224.dino": "ImageNet-1k without labels, self-supervised DINO",
}

# Checkpoint keys that are not the ViT's: timm's classifier and pooling (the encoder has none).
HEAD_PREFIXES = ("head.", "head_drop.", "fc_norm.", "pre_logits.", "attn_pool.")
STEM_PREFIX = "patch_embed.stem."  # PuXIM's conv stem: no checkpoint has it


class VitArchitectureError(WeightMismatchError):
    """A --vit_arch (or --vit_weights tag) that timm does not know or that the encoder cannot be built as."""


@dataclass(frozen=True)
class VitArchitecture:
    """A timm ViT's sizes and what else the encoder builds as it: its keywords of ``VisionTransformer``."""
    name: str  # timm's model name, without the pretrained tag
    sizes: VitSizes
    pre_norm: bool  # a LayerNorm before the first block (CLIP); timm then builds the patch embedding without bias
    act_layer: type  # the MLP's activation: torch's GELU, or timm's QuickGELU (OpenAI's CLIP)
    ln_eps: float  # of every LayerNorm
    qkv_bias: bool

    def layers(self) -> dict:
        """The keywords besides the sizes and the LayerNorm eps (which the run's ``ln_eps`` gives)."""
        return dict(pre_norm=self.pre_norm, act_layer=self.act_layer, qkv_bias=self.qkv_bias)


def _supported_list() -> str:
    return ", ".join(STARTING_POINTS)


def _supported() -> str:
    return f"the supported starting points are {_supported_list()} (docs/starting_points.md)"


@functools.lru_cache(maxsize=None)
def _timm_model(tag: str, source: str, overrides: tuple) -> nn.Module:
    """timm's model of ``tag`` on the meta device: its modules and shapes, no weights, no download."""
    import timm

    if not timm.is_model(tag):
        raise VitArchitectureError(f"{source} {tag}: timm {timm.__version__} knows no such model; {_supported()}")
    try:
        with torch.device("meta"):
            return timm.create_model(tag, pretrained=False, **dict(overrides))
    except Exception as e:  # an unknown pretrained tag, keywords the model does not take
        raise VitArchitectureError(f"{source} {tag}: timm cannot build it ({' '.join(str(e).split())}); "
                                   f"{_what_timm_has(tag)}") from None


def _what_timm_has(tag: str) -> str:
    """The pretrained tags timm has of ``tag``'s model, and the supported starting points: what would fit."""
    import timm

    name = vit_arch_name(tag)
    tags = timm.list_pretrained(f"{name}.*")
    have = f"timm's pretrained tags of {name}: {', '.join(tags)}; " if tags else f"timm has no pretrained {name}; "
    return have + _supported()


def _unsupported(model: nn.Module) -> List[str]:
    """What in ``model`` the encoder does not build (empty: a ViT it builds)."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block, VisionTransformer

    if type(model) is not VisionTransformer:
        return [f"it is a {type(model).__name__}, not timm's VisionTransformer"]
    block = model.blocks[0]
    checks = [
        (model.cls_token is not None and model.global_pool == "token", "PuXIM's embedding is the class token, "
         f"this model has {'none' if model.cls_token is None else 'one'} and pools by {model.global_pool!r}"),
        (model.num_reg_tokens == 0 and not model.no_embed_class, "register tokens or a class token without a "
         "position embedding"),
        (not isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity),
         "no final LayerNorm on the tokens"),
        (type(block) is Block and type(block.mlp) is Mlp, "blocks other than timm's Block with an Mlp"),
        (isinstance(block.ls1, nn.Identity) and isinstance(block.attn.q_norm, nn.Identity), "LayerScale or qk-norm"),
        (isinstance(block.norm1, nn.LayerNorm), f"{type(block.norm1).__name__} instead of LayerNorm"),
        (getattr(block.mlp.act, "approximate", "none") == "none", "the tanh approximation of GELU"),
        (block.attn.proj.bias is not None and block.mlp.fc1.bias is not None, "linear layers without bias"),
        (model.pos_embed is not None, "no position embedding"),
        (isinstance(model.patch_embed.norm, nn.Identity), "a norm after the patch embedding"),
        (not model.dynamic_img_size and not getattr(model.patch_embed, "dynamic_img_pad", False),
         "a dynamic image size or padding"),
    ]
    return [what for ok, what in checks if not ok]


@functools.lru_cache(maxsize=None)
def read_vit_architecture(tag: str, source: str = "--vit_arch", **overrides) -> VitArchitecture:
    """The architecture of timm's model ``tag`` (``vit_base_patch16_clip_quickgelu_224.openai``, or a model name
    without a pretrained tag), read off the model timm builds for it. ``overrides``: keywords of
    ``timm.create_model`` (tests: ``depth=2``). ``source`` names the flag in messages.
    VitArchitectureError when timm does not know ``tag`` or the encoder cannot be built as its model."""
    model = _timm_model(tag, source, tuple(sorted(overrides.items())))
    problems = _unsupported(model)
    if problems:
        raise VitArchitectureError(f"{source} {tag}: the encoder cannot be built as this model ({'; '.join(problems)})"
                                   f"; {_supported()}")
    block = model.blocks[0]
    act_layer = type(block.mlp.act)
    notes = " ".join(model.pretrained_cfg.get("notes") or ())
    if "QuickGELU" in notes and act_layer.__name__ != "QuickGELU":
        _warn_gelu_approximation(tag)
    return VitArchitecture(
        name=vit_arch_name(tag), sizes=VitSizes(
            img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
            embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=block.attn.num_heads,
            mlp_ratio=block.mlp.fc1.out_features / model.embed_dim),
        pre_norm=not isinstance(model.norm_pre, nn.Identity), act_layer=act_layer, ln_eps=float(block.norm1.eps),
        qkv_bias=block.attn.qkv.bias is not None)


@functools.lru_cache(maxsize=None)  # once per tag
def _warn_gelu_approximation(tag: str) -> None:
    _logger.warning("%s: timm's GELU approximation of weights trained with QuickGELU; %s is the architecture they were "
                    "trained with", tag, tag.replace("_clip_", "_clip_quickgelu_", 1))


def _describe(sizes: dict) -> str:
    return (f"patch {sizes['patch_size']}, width {sizes['embed_dim']}, {sizes['depth']} blocks of "
            f"{sizes['num_heads']} heads, MLP ratio {sizes['mlp_ratio']:g}")


def what_fits(patch_size: int, embed_dim: int, img_size: int) -> str:
    """The checkpoints an encoder of these sizes takes, for messages: the patch size fixes the token grid, which
    must be the VxL sampler's; of the b16 preset's sizes, the supported starting points."""
    b16 = get_architecture("b16").encoder
    examples = f", e.g. {_supported_list()}" if (patch_size, embed_dim) == (b16.patch_size, b16.embed_dim) else ""
    grid = img_size // patch_size
    return (f"a ViT of patch {patch_size} and width {embed_dim} (a {grid}x{grid} token grid at {img_size} px, the "
            f"VxL sampler's mask){examples}")


def check_fits_preset(vit_arch: str, preset: str) -> VitArchitecture:
    """``vit_arch``'s architecture when it has the sizes of preset ``preset``'s encoder (its input size aside: the
    position embedding is resampled); VitArchitectureError naming both otherwise. The patch size fixes the token
    grid, which must be the VxL sampler's (ViT-B/16 at 224 px: 14x14)."""
    architecture = read_vit_architecture(vit_arch)
    want = get_architecture(preset).encoder
    have = {k: v for k, v in asdict(architecture.sizes).items() if k != "img_size"}
    wanted = {k: getattr(want, k) for k in have}
    if have != wanted:
        ours = f"the {preset} preset's encoder is {_describe(wanted)}"
        if preset == "b16":
            fix = f": choose {what_fits(want.patch_size, want.embed_dim, want.img_size)}"
        else:
            fix = ": leave --vit_arch out (none) for this preset"
        raise VitArchitectureError(f"--vit_arch {vit_arch} is a ViT of {_describe(have)}; {ours}{fix}")
    return architecture


def timm_state_dict_shapes(tag: str, **overrides) -> dict:
    """``{key: meta tensor}`` of timm's model ``tag``: the keys and shapes of its checkpoints."""
    return dict(_timm_model(tag, "--vit_weights", tuple(sorted(overrides.items()))).state_dict())


def _layout(keys: Iterable[str]) -> frozenset:
    """The ViT's key names, the block index and the classifier head left out: the same for any depth."""
    return frozenset(re.sub(r"^blocks\.\d+\.", "blocks.*.", k) for k in keys
                     if not k.startswith(HEAD_PREFIXES + (STEM_PREFIX,)))


def fitting_starting_points(keys: Iterable[str]) -> List[str]:
    """The supported starting points (:data:`STARTING_POINTS`) whose checkpoints have the key names ``keys`` have."""
    layout = _layout(keys)
    return [tag for tag in STARTING_POINTS if _layout(timm_state_dict_shapes(tag)) == layout]


def ln_eps_mismatch(model_config) -> str | None:
    """A warning when ``--ln_eps`` (the flag's, or a ``--config`` file's) is not the eps of the architecture the
    encoder is built as: allowed (the released ViT's 1e-5), but the starting weights were trained with the other."""
    from utils.config import DEFAULT_VIT_ARCH

    vit_arch = model_config.vit_arch or DEFAULT_VIT_ARCH
    eps = read_vit_architecture(vit_arch).ln_eps
    if model_config.ln_eps == eps:
        return None
    return (f"--ln_eps {model_config.ln_eps:g} is not the LayerNorm eps of {vit_arch}, {eps:g}: the encoder's "
            f"LayerNorms use {model_config.ln_eps:g}")
