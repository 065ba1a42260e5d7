"""The sketch/photo encoder of PuXIM: a timm ViT whose patch embedding is averaged with a conv stem.

PuXIM (following ZSE-SBIR) embeds an image with the *average* of two patch embeddings that both
produce the ``grid x grid x D`` token map:

* the usual ViT patch projection (a ``patch x patch`` conv with stride ``patch``), and
* a 4-conv stem without biases: ``3->c1 (k7 s2 p3), ReLU, c1->c2 (k3 s2 p1), ReLU,
  c2->c3 (k3 s2 p1), ReLU, c3->D (k3 s? p1)``.

Everything else is timm's ``VisionTransformer`` (pre-norm blocks, CLS token, learned position
embedding, final LayerNorm), built as the starting checkpoint's architecture (``--vit_arch``,
``models.vit_architecture``: a LayerNorm before the blocks and no patch bias for CLIP, its activation),
so timm checkpoints load by their own key names (``patch_embed.proj.weight``,
``blocks.0.attn.qkv.weight``, ...) into the network they were trained as. A checkpoint that does not fit
is refused. The stem has no pretrained counterpart and starts from its random init.
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

from utils.config import DEFAULT_VIT_ARCH, INPUT_NORMS, STEM_NORMS, is_timm_tag
from utils.presets import get_architecture

from .vit_architecture import (HEAD_PREFIXES, STEM_PREFIX, check_fits_preset, fitting_starting_points,
                               read_vit_architecture, timm_state_dict_shapes, what_fits)
from .weight_errors import WeightFileNotFoundError, WeightLoadError, WeightMismatchError

_logger = logging.getLogger(__name__)

__all__ = [
    "BatchNormStemEncoder",
    "ConvStemPatchEmbed",
    "ModalityBatchNorm2d",
    "PhotoStandardization",
    "SketchPhotoEncoder",
    "build_encoder",
    "check_vit_weights",
    "load_vit_weights",
    "standardize_images",
    "WeightLoadError",
    "WeightFileNotFoundError",
    "WeightMismatchError",
]

MODALITIES = ("photo", "sketch")



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
              stem_norm: str, ln_eps: float, pre_norm: bool, act_layer: type, qkv_bias: bool) -> VisionTransformer:
    # Every LayerNorm (norm_pre, blocks' norm1/norm2, the final norm) gets ``ln_eps``: timm's 1e-6, CLIP's or the
    # released ViT's 1e-5. Same parameters either way, so any checkpoint loads into both.
    # pre_norm, act_layer, qkv_bias: the starting checkpoint's architecture (models.vit_architecture); with
    # pre_norm timm builds the patch projection without bias, as CLIP's.
    # Dropout as in the released ViT: 0.1 on the embeddings (pos_drop), on the attention output
    # projection and inside the MLP (both via proj_drop_rate); none on the attention weights.
    # timm's `drop_rate` is only the classifier-head dropout, unused here (no head).
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, class_token=True,
        global_pool="token", num_classes=0, drop_rate=0.0, pos_drop_rate=dropout,
        proj_drop_rate=dropout, attn_drop_rate=0.0, drop_path_rate=0.0, pre_norm=pre_norm, act_layer=act_layer,
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
    ``pre_norm``, ``act_layer``, ``qkv_bias``: the starting checkpoint's architecture
    (``VitArchitecture.layers()``); the defaults are timm's plain ViT's.
    """

    stem_norm = "none"  # the paper's stem: convs and ReLUs

    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, dropout: float, stem_channels: Sequence[int], ln_eps: float, input_norm: str,
                 separate_photo_encoder: bool = False, pre_norm: bool = False, act_layer: type = nn.GELU,
                 qkv_bias: bool = True):
        super().__init__()
        self.input_norm = input_norm
        # Parameter-free modules: the state-dict keys do not depend on input_norm.
        self.input_norms = nn.ModuleDict({"photo": make_input_norm(input_norm), "sketch": nn.Identity()})
        vit_kwargs = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                          num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                          stem_channels=stem_channels, stem_norm=self.stem_norm, ln_eps=ln_eps, pre_norm=pre_norm,
                          act_layer=act_layer, qkv_bias=qkv_bias)
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
                  input_norm: str, vit_arch: Optional[str] = None) -> SketchPhotoEncoder:
    """The encoder of preset ``arch`` (its sizes: ``utils.presets.ARCHITECTURES``) with the run's settings, built as
    timm's model ``vit_arch`` (none: timm's plain ViT); ``stem_norm`` picks the class (:data:`ENCODERS`)."""
    if stem_norm not in ENCODERS:
        raise ValueError(f"stem_norm must be one of {STEM_NORMS}, got {stem_norm!r}")
    architecture = (check_fits_preset(vit_arch, arch) if vit_arch is not None
                    else read_vit_architecture(DEFAULT_VIT_ARCH))
    sizes = asdict(get_architecture(arch).encoder)
    return ENCODERS[stem_norm](**sizes, **architecture.layers(), separate_photo_encoder=separate_photo_encoder,
                               dropout=dropout, ln_eps=float(ln_eps), input_norm=input_norm)


# --------------------------------------------------------------------- weights
_WHAT_FITS = ("--vit_weights takes a timm-format state dict (.safetensors, .pth) or a timm tag such as "
              "vit_base_patch16_224.orig_in21k (docs/starting_points.md)")


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def read_safetensors(path: str, what_fits: str = "") -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (ViT or CLIP weights); WeightLoadError naming the file, why, and
    ``what_fits`` when given."""
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise WeightLoadError(f"{path}: not a readable safetensors file ({_first_line(e)})"
                              + (f"; {what_fits}" if what_fits else "")) from e


def _read_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a timm-format state dict from ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin``."""
    if path.endswith(".safetensors"):
        return read_safetensors(path, _WHAT_FITS)
    if path.endswith(".npz"):
        raise WeightLoadError(
            f"{path}: JAX .npz checkpoints are not read here; convert it with timm "
            f"(timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))) and save "
            f"its state_dict() as .pth or .safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightLoadError(f"{path}: not a readable PyTorch state dict ({_first_line(e)}); {_WHAT_FITS}") from e
    # Unwrap the usual training-checkpoint containers.
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightLoadError(f"{path}: not a state dict (a dict of tensors); {_WHAT_FITS}")
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


def _match_keys(vit: VisionTransformer, source_sd: Dict[str, torch.Tensor], source: str) -> dict:
    """The checkpoint's keys sorted against the state dict of ``vit``: ``loaded`` (``resampled``: a position
    embedding of another grid, key -> (its shape, the ViT's)), ``ignored_head``, ``unexpected``, and the ViT's keys
    it lacks: ``random_init`` (the stem) and ``missing``. A shape that cannot be made to fit: WeightMismatchError
    naming what would."""
    target = vit.state_dict()
    report = dict(source=source, loaded=[], missing=[], unexpected=[], ignored_head=[], random_init=[], resampled={})
    for key, value in source_sd.items():
        if key.startswith(HEAD_PREFIXES):
            report["ignored_head"].append(key)
            continue
        if key not in target:
            report["unexpected"].append(key)
            continue
        want = target[key].shape
        if value.shape != want:
            if not (key == "pos_embed" and value.ndim == 3 and value.shape[-1] == want[-1]):
                fits = what_fits(vit.patch_embed.patch_size[0], vit.embed_dim, vit.patch_embed.img_size[0])
                raise WeightMismatchError(f"{source}: key {key!r} has shape {tuple(value.shape)} in the checkpoint "
                                          f"but {tuple(want)} in the encoder; {fits} fits (docs/starting_points.md)")
            report["resampled"][key] = (tuple(value.shape), tuple(want))  # e.g. a 384 px checkpoint
        report["loaded"].append(key)
    if not report["loaded"]:
        raise WeightMismatchError(
            f"{source}: none of its {len(source_sd)} keys is a timm VisionTransformer key (e.g. "
            f"'blocks.0.attn.qkv.weight'); convert the checkpoint to timm's naming first")
    for key in target:
        if key not in source_sd:
            report["random_init" if key.startswith(STEM_PREFIX) else "missing"].append(key)
    return report


def _listed(keys: list) -> str:
    return (", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")) if keys else "none"


def _refuse_mismatch(report: dict, source_keys, vit_arch: Optional[str]) -> None:
    """WeightMismatchError, one line, when the checkpoint has keys the encoder lacks or lacks keys it needs."""
    if not (report["unexpected"] or report["missing"]):
        return
    fits = fitting_starting_points(source_keys)
    fix = (f"its keys are those of --vit_arch {' or '.join(fits)}" if fits else
           "its keys are none of the supported starting points' (docs/starting_points.md): name the timm "
           "architecture it belongs to with --vit_arch")
    raise WeightMismatchError(
        f"{report['source']} does not fit the encoder built as {vit_arch or DEFAULT_VIT_ARCH}: keys the encoder "
        f"lacks: {_listed(report['unexpected'])}; keys it needs that the checkpoint lacks: "
        f"{_listed(report['missing'])}; {fix}; --allow_partial_weights loads it anyway, the unmatched keys left at "
        f"their init")


def _load_into_vit(vit: VisionTransformer, source_sd: Dict[str, torch.Tensor], report: dict) -> None:
    """Load ``report``'s ``loaded`` keys of ``source_sd`` into ``vit`` (strict: the other keys keep their value)."""
    full = vit.state_dict()
    for key in report["loaded"]:
        value = source_sd[key]
        if key in report["resampled"]:
            value = resample_abs_pos_embed(value.float(), new_size=list(vit.patch_embed.grid_size),
                                           num_prefix_tokens=vit.num_prefix_tokens)
        full[key] = value.to(full[key].dtype)
    vit.load_state_dict(full, strict=True)


def _source_state_dict(source: str, *, download: bool) -> Dict[str, torch.Tensor]:
    """The state dict of a file, or of a timm tag: downloaded, or without ``download`` timm's model's keys and
    shapes (meta tensors)."""
    if os.path.isfile(source):
        return _read_state_dict_file(source)
    if not is_timm_tag(source):
        raise WeightFileNotFoundError(f"ViT weights file not found: {source}")
    return _state_dict_from_timm_tag(source) if download else timm_state_dict_shapes(source)


def check_vit_weights(encoder: SketchPhotoEncoder, source: str, *, vit_arch: Optional[str] = None,
                      allow_partial: bool = False) -> dict:
    """What :func:`load_vit_weights` would load, without loading (``encoder`` may be on the meta device, a tag is
    not downloaded): its report, or the error it would raise. train.py calls it before reading any data."""
    source = os.fspath(source)
    return _matched_reports((encoder.vit,), _source_state_dict(source, download=False), source, vit_arch=vit_arch,
                            allow_partial=allow_partial)[0]


def _matched_reports(vits, source_sd: Dict[str, torch.Tensor], source: str, *, vit_arch: Optional[str],
                     allow_partial: bool) -> list:
    """:func:`_match_keys`' report for each ViT; a checkpoint that does not fit is refused unless ``allow_partial``."""
    reports = [_match_keys(vit, source_sd, source) for vit in vits]
    if not allow_partial:
        _refuse_mismatch(reports[0], source_sd, vit_arch)
    return reports


def load_vit_weights(encoder: SketchPhotoEncoder, source: str, *, vit_arch: Optional[str] = None,
                     allow_partial: bool = False) -> dict:
    """Load timm-format ViT weights into the encoder (into both ViTs when untied).

    ``source`` is a local ``.safetensors`` / ``.pth`` / ``.pt`` state dict, or a timm tag such as
    ``vit_base_patch16_224.orig_in21k`` (downloaded through timm, so it needs internet); ``vit_arch`` the
    architecture the encoder was built as, for messages. Position embeddings of another grid are resampled;
    classifier-head keys are ignored; the conv stem keeps its random init. A checkpoint with keys the encoder
    lacks, or lacking keys it needs, is refused unless ``allow_partial`` (then they are logged as warnings); a
    shape mismatch of any other key is always refused (WeightMismatchError).

    Returns a report: ``loaded``, ``missing``, ``unexpected``, ``ignored_head``, ``random_init``
    (key lists of the first ViT) and ``resampled`` (key -> (old shape, new shape)).
    """
    source = os.fspath(source)
    source_sd = _source_state_dict(source, download=True)
    reports = _matched_reports(encoder.vits(), source_sd, source, vit_arch=vit_arch, allow_partial=allow_partial)
    for vit, vit_report in zip(encoder.vits(), reports):
        _load_into_vit(vit, source_sd, vit_report)
    _log_report(reports[0], len(reports))
    return reports[0]


def _log_report(report: dict, n_encoders: int) -> None:
    source = report["source"]
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
    _logger.info("%s: loaded %d tensors into %d encoder(s)", source, len(report["loaded"]), n_encoders)
