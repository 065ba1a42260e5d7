"""The sketch/photo encoder of PuXIM: a timm ViT whose patch embedding is averaged with a conv stem.

PuXIM (following ZSE-SBIR) embeds an image with the *average* of two patch embeddings that both
produce the ``grid x grid x D`` token map:

* the usual ViT patch projection (a ``patch x patch`` conv with stride ``patch``), and
* a 4-conv stem without biases: ``3->c1 (k7 s2 p3), ReLU, c1->c2 (k3 s2 p1), ReLU,
  c2->c3 (k3 s2 p1), ReLU, c3->D (k3 s? p1)``.

Everything else is timm's ``VisionTransformer`` (pre-norm blocks, CLS token, learned position
embedding, final LayerNorm), so timm / ImageNet-21k checkpoints load by their own key names
(``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ...). The stem has no pretrained
counterpart and starts from its random init.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from functools import partial
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from timm.layers import LayerNorm, PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from utils.config import INPUT_NORMS, STEM_NORMS
from utils.presets import get_architecture

_logger = logging.getLogger(__name__)

__all__ = [
    "BatchNormStemEncoder",
    "ConvStemPatchEmbed",
    "ModalityBatchNorm2d",
    "PhotoStandardization",
    "SketchPhotoEncoder",
    "build_encoder",
    "load_vit_weights",
    "standardize_images",
    "WeightLoadError",
    "WeightFileNotFoundError",
    "WeightMismatchError",
]

MODALITIES = ("photo", "sketch")

# Checkpoint keys of timm's classifier (and pooling) that the encoder does not have.
_HEAD_PREFIXES = ("head.", "head_drop.", "fc_norm.", "pre_logits.", "attn_pool.")


class WeightLoadError(RuntimeError):
    """A pretrained-weight source could not be read (missing file, offline hub, bad format)."""


class WeightFileNotFoundError(WeightLoadError, FileNotFoundError):
    """A weight file named on the command line does not exist."""


class WeightMismatchError(WeightLoadError, ValueError):
    """Weights that do not fit the model (other architecture, other key names, missing piece)."""


def _stem_strides(patch_size: int) -> Tuple[int, int, int, int]:
    """Strides of the 4 stem convs: 2 while needed to reach ``patch_size``, then 1.

    ViT-B/16 gets (2, 2, 2, 2) = the released stem; patch 8 gets (2, 2, 2, 1).
    """
    log2 = math.log2(patch_size)
    if not log2.is_integer() or not 1 <= log2 <= 4:
        raise ValueError(
            f"the conv stem needs a patch size of 2, 4, 8 or 16 (a product of 4 strides of 1 or 2), "
            f"got {patch_size}")
    n_down = int(log2)
    return tuple(2 if i < n_down else 1 for i in range(4))  # type: ignore[return-value]


class ModalityBatchNorm2d(nn.Module):
    """A BatchNorm2d per modality (``photo``, ``sketch``): statistics and affine parameters of its own.

    Sketches and photos go through the encoder in separate calls, so in training each modality is
    normalised by its own batch statistics. One shared BatchNorm would then keep *running*
    statistics that average the two (a white sketch's and a photo's are far apart), and evaluation
    would normalise both with that mixture, unlike in training. With one BatchNorm per modality,
    evaluation uses the statistics each modality was trained with. ``modality`` is set before each
    call (:meth:`set_modality`; :class:`BatchNormStemEncoder` does it for its stem).
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.photo = nn.BatchNorm2d(num_features)
        self.sketch = nn.BatchNorm2d(num_features)
        self.modality = "photo"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sketch(x) if self.modality == "sketch" else self.photo(x)  # [B, C, H, W]

    @staticmethod
    def set_modality(module: nn.Module, modality: str) -> None:
        """Point every ``ModalityBatchNorm2d`` inside ``module`` at ``modality``'s statistics."""
        if modality not in ("photo", "sketch"):
            raise ValueError(f"modality must be 'photo' or 'sketch', got {modality!r}")
        for layer in module.modules():
            if isinstance(layer, ModalityBatchNorm2d):
                layer.modality = modality


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose output is averaged with a 4-conv stem (ZSE-SBIR / PuXIM).

    Keeps timm's ``proj`` conv (so ``patch_embed.proj.*`` loads from any timm ViT checkpoint) and
    adds ``stem`` (``patch_embed.stem.*``, no pretrained counterpart). Only the fixed-size,
    flattened output that ``VisionTransformer`` uses by default is supported.

    ``stem_norm="batch"`` puts a BatchNorm after each stem conv (the ``tiny`` preset only; the paper's
    stem has none). Sketches and photos go through the encoder in separate calls, so in training each
    modality is normalised by its own batch statistics, and the stem's output starts at unit scale
    instead of ~0.02 (PyTorch's default conv init shrinks it at every layer). Together these let a
    from-scratch ViT escape the triplet loss's collapse on a CPU budget.
    """

    def __init__(self, *, stem_channels: Sequence[int], stem_norm: str, **kwargs):
        if kwargs.get("output_fmt") is not None or kwargs.get("dynamic_img_pad", False):
            raise ValueError("ConvStemPatchEmbed supports only the default flattened, fixed-size output")
        super().__init__(**kwargs)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"ConvStemPatchEmbed needs a square patch, got {self.patch_size}")
        c1, c2, c3 = stem_channels
        s1, s2, s3, s4 = _stem_strides(self.patch_size[0])
        embed_dim = self.proj.out_channels
        in_chans = self.proj.in_channels
        if stem_norm not in STEM_NORMS:
            raise ValueError(f"stem_norm must be one of {STEM_NORMS}, got {stem_norm!r}")
        self.stem_norm = stem_norm
        convs = [
            nn.Conv2d(in_chans, c1, kernel_size=7, stride=s1, padding=3, bias=False),
            nn.Conv2d(c1, c2, kernel_size=3, stride=s2, padding=1, bias=False),
            nn.Conv2d(c2, c3, kernel_size=3, stride=s3, padding=1, bias=False),
            nn.Conv2d(c3, embed_dim, kernel_size=3, stride=s4, padding=1, bias=False),
        ]
        layers = []
        for i, conv in enumerate(convs):  # conv [BN] ReLU x3, then conv [BN]
            layers.append(conv)
            if stem_norm == "batch":
                layers.append(ModalityBatchNorm2d(conv.out_channels))
            if i < len(convs) - 1:
                layers.append(nn.ReLU(inplace=True))
        # Without a norm the module indices (stem.0, stem.2, stem.4, stem.6) are the released stem's.
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape  # [B, 3, H, W]
        if self.strict_img_size and (h, w) != tuple(self.img_size):
            raise ValueError(f"the encoder expects {self.img_size[0]}x{self.img_size[1]} images, got {h}x{w}")
        x = (self.proj(x) + self.stem(x)) / 2  # [B, D, H/p, W/p]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        return self.norm(x)


def standardize_images(images: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Each image minus its own per-channel mean, divided by its own standard deviation.

    The result does not change when an image is made brighter or darker, or its contrast is scaled
    (``a * x + b`` with ``a > 0``, the same for every channel): a low-contrast photo reaches the
    ViT at the same scale as a vivid one. ``eps`` keeps a flat image (std 0) finite, at zero.
    """
    centred = images - images.mean(dim=(-2, -1), keepdim=True)  # [B, C, H, W]
    return centred / (centred.flatten(1).std(dim=1)[:, None, None, None] + eps)  # [B, C, H, W]


class PhotoStandardization(nn.Module):
    """:func:`standardize_images` as a module, for the encoder's photo input (``input_norm="photo"``).

    It has no parameters or buffers: a checkpoint's keys are the same with and without it.
    """

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = float(eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return standardize_images(images, self.eps)  # [B, C, H, W]


def check_input_norm(input_norm: str) -> str:
    """``input_norm`` when it is one of :data:`INPUT_NORMS`; ValueError naming them otherwise."""
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
    return input_norm


def make_input_norm(input_norm: str) -> nn.Module:
    """The module for ``input_norm`` (:data:`INPUT_NORMS`): ``"none"`` is ``nn.Identity``."""
    return PhotoStandardization() if check_input_norm(input_norm) == "photo" else nn.Identity()


def _make_vit(*, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
              mlp_ratio: float, dropout: float, stem_channels: Sequence[int],
              stem_norm: str, ln_eps: float) -> VisionTransformer:
    # Every LayerNorm (blocks' norm1/norm2, the final norm) gets ``ln_eps``: timm's 1e-6, or torch's 1e-5 as in
    # the released ViT. Same parameters either way, so any checkpoint loads into both.
    # Dropout as in the released ViT: 0.1 on the embeddings (pos_drop), on the attention output
    # projection and inside the MLP (both via proj_drop_rate); none on the attention weights.
    # timm's `drop_rate` is only the classifier-head dropout, unused here (no head).
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, class_token=True,
        global_pool="token", num_classes=0, drop_rate=0.0, pos_drop_rate=dropout,
        proj_drop_rate=dropout, attn_drop_rate=0.0, drop_path_rate=0.0,
        embed_layer=partial(ConvStemPatchEmbed, stem_channels=tuple(stem_channels), stem_norm=stem_norm),
        norm_layer=partial(LayerNorm, eps=float(ln_eps)),
    )


class SketchPhotoEncoder(nn.Module):
    """ViT encoder for sketches and photos (shared weights by default), with the paper's bare conv stem.

    ``forward(images, modality) -> [B, 1 + N, D]`` tokens after the final LayerNorm;
    ``embed(images, modality) -> [B, D]`` the CLS token, PuXIM's retrieval embedding.
    With ``separate_photo_encoder=True`` sketches go through ``vit`` and photos through a second,
    untied ``photo_vit`` (the paper's figure draws two encoders; the released code shares one).
    Each modality's images pass ``input_norms[modality]`` first: ``nn.Identity`` for both in the paper;
    ``input_norm="photo"`` makes the photos' a :class:`PhotoStandardization` (the ``tiny`` preset).
    The stem's norm is the class's (:attr:`stem_norm`): :class:`BatchNormStemEncoder` has BatchNorms.
    """

    stem_norm = "none"  # the paper's stem: convs and ReLUs

    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, dropout: float, stem_channels: Sequence[int], ln_eps: float, input_norm: str,
                 separate_photo_encoder: bool = False):
        super().__init__()
        self.input_norm = input_norm
        # Parameter-free modules: the state-dict keys do not depend on input_norm.
        self.input_norms = nn.ModuleDict({"photo": make_input_norm(input_norm), "sketch": nn.Identity()})
        vit_kwargs = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                          num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                          stem_channels=stem_channels, stem_norm=self.stem_norm, ln_eps=ln_eps)
        self.vit = _make_vit(**vit_kwargs)  # sketches (and photos unless separate)
        self.photo_vit: Optional[VisionTransformer] = _make_vit(**vit_kwargs) if separate_photo_encoder else None
        self._img_size = img_size

    # ----------------------------------------------------------------- properties
    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    @property
    def grid_size(self) -> Tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def img_size(self) -> int:
        return self._img_size

    @property
    def separate_photo_encoder(self) -> bool:
        return self.photo_vit is not None

    def vits(self) -> Tuple[VisionTransformer, ...]:
        """All ViTs of this encoder (one when shared, sketch then photo when separate)."""
        return (self.vit,) if self.photo_vit is None else (self.vit, self.photo_vit)

    def stem_parameters(self):
        """Parameters of the conv stem(s), which have no pretrained counterpart."""
        for vit in self.vits():
            yield from vit.patch_embed.stem.parameters()

    # ----------------------------------------------------------------- forward
    def _vit_for(self, modality: str) -> VisionTransformer:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if modality == "photo" and self.photo_vit is not None:
            return self.photo_vit
        return self.vit

    def forward(self, images: torch.Tensor, modality: str = "photo") -> torch.Tensor:
        vit = self._vit_for(modality)
        images = self.input_norms[modality](images)  # [B, 3, H, W]
        return vit.forward_features(images)  # [B, 1 + N, D], after the final norm

    def embed(self, images: torch.Tensor, modality: str = "photo") -> torch.Tensor:
        return self(images, modality)[:, 0]  # [B, D] CLS token; self(): compiled when compile() was called


class BatchNormStemEncoder(SketchPhotoEncoder):
    """The encoder whose conv stem has a :class:`ModalityBatchNorm2d` after each conv (the ``tiny`` preset).

    Each call first points the stem's BatchNorms at its modality's statistics; the paper's encoder,
    whose stem has none, does no such step.
    """

    stem_norm = "batch"

    def forward(self, images: torch.Tensor, modality: str = "photo") -> torch.Tensor:
        ModalityBatchNorm2d.set_modality(self._vit_for(modality).patch_embed.stem, modality)
        return super().forward(images, modality)  # [B, 1 + N, D]


ENCODERS = {"none": SketchPhotoEncoder, "batch": BatchNormStemEncoder}  # stem_norm -> encoder class


def build_encoder(arch: str, *, separate_photo_encoder: bool, dropout: float, stem_norm: str, ln_eps: float,
                  input_norm: str) -> SketchPhotoEncoder:
    """The encoder of preset ``arch`` (its sizes: ``utils.presets.ARCHITECTURES``) with the run's settings;
    ``stem_norm`` picks the class (:data:`ENCODERS`)."""
    if stem_norm not in ENCODERS:
        raise ValueError(f"stem_norm must be one of {STEM_NORMS}, got {stem_norm!r}")
    sizes = asdict(get_architecture(arch).encoder)
    return ENCODERS[stem_norm](**sizes, separate_photo_encoder=separate_photo_encoder, dropout=dropout,
                               ln_eps=float(ln_eps), input_norm=input_norm)


# --------------------------------------------------------------------- weights
def _read_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a timm-format state dict from ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise WeightLoadError(f"{path}: not a readable safetensors file ({e})") from e
    if path.endswith(".npz"):
        raise WeightLoadError(
            f"{path}: JAX .npz checkpoints are not read here; convert it with timm "
            f"(timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))) and save "
            f"its state_dict() as .pth or .safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightLoadError(f"{path}: not a readable PyTorch state dict ({e})") from e
    # Unwrap the usual training-checkpoint containers.
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightLoadError(f"{path}: expected a dict of tensors (a timm state dict)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _state_dict_from_timm_tag(tag: str) -> Dict[str, torch.Tensor]:
    """Download ``tag`` (e.g. ``vit_base_patch16_224.orig_in21k``) through timm, only when asked."""
    import timm
    try:
        model = timm.create_model(tag, pretrained=True)
    except Exception as e:  # offline hub, unknown tag, ...
        raise WeightLoadError(
            f"could not get the timm weights {tag!r} ({type(e).__name__}: {e}). Without internet pass a "
            f"local timm-format file instead, e.g. --vit_weights /path/to/vit_base_patch16_224.safetensors"
        ) from e
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _load_into_vit(vit: VisionTransformer, source_sd: Dict[str, torch.Tensor], source: str) -> dict:
    target = vit.state_dict()
    report = dict(source=source, loaded=[], missing=[], unexpected=[], ignored_head=[],
                  random_init=[], resampled={})
    new_sd = {}
    for key, value in source_sd.items():
        if key.startswith(_HEAD_PREFIXES):
            report["ignored_head"].append(key)
            continue
        if key not in target:
            report["unexpected"].append(key)
            continue
        want = target[key].shape
        if value.shape != want:
            if key == "pos_embed" and value.ndim == 3 and value.shape[-1] == want[-1]:
                # Another grid size (e.g. a 384px checkpoint): resample the patch part with timm.
                value = resample_abs_pos_embed(
                    value.float(), new_size=list(vit.patch_embed.grid_size),
                    num_prefix_tokens=vit.num_prefix_tokens)
                report["resampled"][key] = (tuple(source_sd[key].shape), tuple(want))
            else:
                raise WeightMismatchError(
                    f"{source}: key {key!r} has shape {tuple(value.shape)} in the checkpoint but "
                    f"{tuple(want)} in the encoder")
        new_sd[key] = value.to(target[key].dtype)
        report["loaded"].append(key)
    if not new_sd:
        raise WeightMismatchError(
            f"{source}: none of its {len(source_sd)} keys is a timm VisionTransformer key (e.g. "
            f"'blocks.0.attn.qkv.weight'); convert the checkpoint to timm's naming first")
    for key in target:
        if key in new_sd:
            continue
        if key.startswith("patch_embed.stem."):
            report["random_init"].append(key)
        else:
            report["missing"].append(key)
    # Every key of the model is given (loaded or its current value): a strict load.
    full = dict(target)
    full.update(new_sd)
    vit.load_state_dict(full, strict=True)
    return report


def load_vit_weights(encoder: SketchPhotoEncoder, source: str) -> dict:
    """Load timm-format ViT weights into the encoder (into both ViTs when untied).

    ``source`` is a local ``.safetensors`` / ``.pth`` / ``.pt`` state dict, or a timm tag such as
    ``vit_base_patch16_224.orig_in21k`` (downloaded through timm, so it needs internet).
    Position embeddings of another grid are resampled; classifier-head keys are ignored; the
    conv stem keeps its random init. A shape mismatch of any other key raises ``ValueError``.

    Returns a report: ``loaded``, ``missing``, ``unexpected``, ``ignored_head``, ``random_init``
    (key lists of the first ViT) and ``resampled`` (key -> (old shape, new shape)).
    """
    source = os.fspath(source)
    if os.path.isfile(source):
        source_sd = _read_state_dict_file(source)
    elif os.sep in source or source.endswith((".safetensors", ".pth", ".pt", ".bin", ".npz")):
        raise WeightFileNotFoundError(f"ViT weights file not found: {source}")
    else:
        source_sd = _state_dict_from_timm_tag(source)

    reports = [_load_into_vit(vit, source_sd, source) for vit in encoder.vits()]
    report = reports[0]
    if report["ignored_head"]:
        _logger.info("%s: ignored classifier-head keys %s", source, report["ignored_head"])
    if report["resampled"]:
        _logger.info("%s: resampled %s", source, report["resampled"])
    _logger.info("%s: conv stem initialised randomly (%d tensors, no pretrained counterpart)",
                 source, len(report["random_init"]))
    if report["missing"]:
        _logger.warning("%s: keys missing from the checkpoint (left at their init): %s",
                        source, report["missing"])
    if report["unexpected"]:
        _logger.warning("%s: unexpected checkpoint keys (not used): %s", source, report["unexpected"])
    _logger.info("%s: loaded %d tensors into %d encoder(s)", source, len(report["loaded"]), len(reports))
    return report
