"""The VxL sampler: a frozen CLIP + CLIP Surgery that scores photo patches by class relevance.

For each photo and its class name the sampler

1. runs the CLIP image tower with *architecture surgery* (CLIP Surgery, Li et al. 2023) on the
   last ``surgery_depth`` blocks: beside the normal path a second path accumulates, block after
   block, v-v self-attention (``softmax(v vᵀ · scale) v``, the block's own qkv / out projections,
   no MLP) of the normal path's ``ln_1`` input. Patch tokens come from that path, the CLS token
   from the normal one; then ``ln_post`` and the visual projection -> ``[B, 1 + N, E]``;
2. L2-normalises these features over the **token** axis (the released code's quirk, default) or
   the channel axis;
3. runs *feature surgery* against the texts ``["a", prompt.format(class)]``: with image features
   F ``[1+N, E]`` and text features T ``[2, E]``, ``w = softmax(2 F[0] Tᵀ)``, ``w /= mean(w)``,
   ``G[n, t] = F[n] ⊙ T[t] · w[t]``, ``G -= mean_t G``, ``S[n, t] = Σ_c G[n, t, c]``; the
   relevance of patch n is ``S[n, class]``;
4. keeps the most relevant patches: the ``floor(N · (1 - keep_ratio)) + 1`` lowest get 0
   (138 of 196 for ViT-B/16 at keep ratio 0.3, leaving 58).

The CLIP model is open_clip's; the surgery is a thin loop over its own blocks (``ln_1``,
``attn.in_proj_weight/bias``, ``attn.out_proj``). Everything runs frozen under ``no_grad``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.normalization import ENCODER_MEAN, ENCODER_STD  # the encoder's, undone for CLIP
from utils.config import ModelConfig
from utils.presets import CLIP_MODEL_NAME, SamplerConfig, get_architecture  # CLIP_MODEL_NAME re-exported

from .encoder import WeightFileNotFoundError, WeightLoadError, WeightMismatchError, read_safetensors

_logger = logging.getLogger(__name__)

__all__ = ["VxLSampler", "build_vxl_sampler", "sampler_for", "sampler_keywords", "build_tiny_clip", "build_random_clip",
           "load_openai_state_dict", "clip_file_activation", "TINY_CLIP_CFG", "CLIP_MODEL_NAME"]

# The `tiny` preset's random CLIP (utils.presets.ARCHITECTURES["tiny"].sampler: its config and surgery depth),
# for CPU tests. Read-only: tiny_clip_cfg() gives a copy.
TINY_CLIP_CFG = get_architecture("tiny").sampler.random_clip
TINY_SURGERY_DEPTH = get_architecture("tiny").sampler.surgery_depth
RANDOM_CLIP_SEED = 0  # a random CLIP's weights: the same in every run (the mask cache's key names it)

# Entries of OpenAI checkpoints (and TorchScript archives) that are not model weights.
_OPENAI_RELEASE_KEYS = ("input_resolution", "context_length", "vocab_size")  # only OpenAI's files have these
_OPENAI_NON_WEIGHT_KEYS = _OPENAI_RELEASE_KEYS + ("attn_mask",)
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"  # beside open_clip's checkpoints on the Hugging Face hub
QUICKGELU_SUFFIX = "-quickgelu"  # open_clip's name of a config with QuickGELU: ViT-B-16-quickgelu


class VxLSampler(nn.Module):
    """Frozen CLIP-Surgery sampler: ``relevance(images, names) -> [B, N]``, ``forward -> [B, N]`` mask.

    Args:
        clip_model: an ``open_clip.CLIP`` with a ViT image tower (OpenAI-style blocks).
        tokenizer: open_clip tokenizer (``list[str] -> LongTensor [n, context]``).
        keep_ratio: fraction of patches kept (0.3 in the paper).
        prompt: text template for the class name; ``"{}"`` (bare name) as in the released code,
            ``"a photo of {}"`` as in the paper's figure.
        feature_norm: ``"token"`` (L2 over the token axis, the released code) or ``"channel"``.
        input_norm: ``"encoder"`` feeds the encoder-normalised photos as they are (released code);
            ``"clip"`` converts them to CLIP's own mean/std first.
        surgery_depth: number of last visual blocks with the surgery path (6 for ViT-B/16).
    """

    def __init__(self, clip_model: nn.Module, tokenizer, *, keep_ratio: float = ModelConfig.keep_ratio,
                 prompt: str = ModelConfig.prompt, feature_norm: str = ModelConfig.vxl_norm,
                 input_norm: str = ModelConfig.clip_input_norm, surgery_depth: int = SamplerConfig.surgery_depth):
        super().__init__()
        import open_clip
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(clip_model, "visual", None)
        if not isinstance(visual, VisionTransformer) or not hasattr(clip_model, "encode_text"):
            raise TypeError("VxLSampler needs an open_clip CLIP model with a ViT image tower "
                            f"(got {type(clip_model).__name__})")
        if visual.attn_pool is not None or getattr(visual, "final_ln_after_pool", False):
            raise TypeError("VxLSampler supports OpenAI-style CLIP ViTs (token pooling, no attention pool)")
        blocks = visual.transformer.resblocks
        if not all(isinstance(b, ResidualAttentionBlock) and isinstance(b.attn, nn.MultiheadAttention)
                   for b in blocks):
            raise TypeError("VxLSampler needs open_clip ResidualAttentionBlocks with nn.MultiheadAttention")
        if not 1 <= surgery_depth <= len(blocks):
            raise ValueError(f"surgery_depth must be in [1, {len(blocks)}], got {surgery_depth}")
        if not 0.0 < keep_ratio < 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1), got {keep_ratio}")
        if feature_norm not in ("token", "channel"):
            raise ValueError(f"feature_norm must be 'token' or 'channel', got {feature_norm!r}")
        if input_norm not in ("encoder", "clip"):
            raise ValueError(f"input_norm must be 'encoder' or 'clip', got {input_norm!r}")
        try:
            takes_name = prompt.format("\0") != prompt
        except (IndexError, KeyError, ValueError):
            takes_name = False
        if not takes_name:
            raise ValueError(f"prompt must be a template with one '{{}}' for the class name, got {prompt!r}")

        self.clip = clip_model
        self.tokenizer = tokenizer
        self.keep_ratio = float(keep_ratio)
        self.prompt = prompt
        self.feature_norm = feature_norm
        self.input_norm = input_norm
        self.surgery_depth = int(surgery_depth)

        # CLIP's own normalisation, for input_norm="clip" (open_clip sets it on OpenAI models).
        clip_mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        clip_std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("_clip_mean", torch.tensor(clip_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_clip_std", torch.tensor(clip_std).view(1, 3, 1, 1), persistent=False)
        # The encoder's, to undo it (buffers: no host-to-device copy in every forward).
        self.register_buffer("_enc_mean", torch.tensor(ENCODER_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_enc_std", torch.tensor(ENCODER_STD).view(1, 3, 1, 1), persistent=False)

        # Text features per text ("a" and each prompted class name), computed once: the released
        # code re-ran the text encoder for every sample of every step.
        self._text_cache: Dict[str, torch.Tensor] = {}

        self.clip.requires_grad_(False)
        self.train(False)

    # ----------------------------------------------------------------- frozen
    def train(self, mode: bool = True) -> "VxLSampler":
        """Always stays in eval mode: CLIP is a fixed teacher here."""
        return super().train(False)

    @property
    def image_size(self) -> int:
        return int(self.clip.visual.image_size[0])

    @property
    def num_patches(self) -> int:
        gh, gw = self.clip.visual.grid_size
        return gh * gw

    @property
    def num_masked(self) -> int:
        """Patches set to 0 per image: ``floor(N * (1 - keep_ratio)) + 1`` (as the released code)."""
        # The tiny epsilon keeps e.g. 100 * (1 - 0.3) = 69.999... from flooring to 69.
        return min(self.num_patches, math.floor(self.num_patches * (1.0 - self.keep_ratio) + 1e-9) + 1)

    # ----------------------------------------------------------------- image side
    def _to_clip_input(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_norm == "encoder":
            return images
        pixels = images * self._enc_std.to(images) + self._enc_mean.to(images)  # [B, 3, H, W] back to [0, 1]
        return (pixels - self._clip_mean.to(images)) / self._clip_std.to(images)

    @staticmethod
    def _vv_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """CLIP Surgery's v-v self-attention of one open_clip block on ``x`` ``[B, L, W]``."""
        attn: nn.MultiheadAttention = block.attn
        width, heads = attn.embed_dim, attn.num_heads
        b, l, _ = x.shape
        h = block.ln_1(x)  # [B, L, W]
        w_v = attn.in_proj_weight[2 * width:]  # rows of v in the packed [q; k; v] projection
        b_v = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
        v = F.linear(h, w_v, b_v).view(b, l, heads, width // heads).transpose(1, 2)  # [B, H, L, d]
        # softmax(v vᵀ / sqrt(d)) v: query = key = value = v
        out = F.scaled_dot_product_attention(v, v, v)  # [B, H, L, d]
        out = out.transpose(1, 2).reshape(b, l, width)  # [B, L, W]
        return block.ls_1(attn.out_proj(out))

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-Surgery image features ``[B, 1 + N, E]`` (before any L2 normalisation)."""
        visual = self.clip.visual
        if tuple(images.shape[-2:]) != tuple(visual.image_size):
            raise ValueError(f"the VxL sampler's CLIP expects {tuple(visual.image_size)} images, "
                             f"got {tuple(images.shape[-2:])}")
        dtype = visual.conv1.weight.dtype
        x = self._to_clip_input(images).to(dtype)

        # Embedding, as open_clip's VisionTransformer does it: patches, CLS, position, ln_pre.
        x = visual.conv1(x).flatten(2).transpose(1, 2)  # [B, N, W]
        cls = visual.class_embedding.to(dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(dtype)  # [B, 1 + N, W]
        x = visual.ln_pre(x)

        batch_first = getattr(visual.transformer, "batch_first", False)

        def run_block(block, t):  # open_clip blocks are batch-first unless the tower says otherwise
            return block(t) if batch_first else block(t.transpose(0, 1)).transpose(0, 1)

        blocks = visual.transformer.resblocks
        n_plain = len(blocks) - self.surgery_depth
        for block in blocks[:n_plain]:
            x = run_block(block, x)
        # CLIP Surgery: the new path starts from the input of the first surgery block and adds,
        # at every surgery block, the v-v attention of that block's normal-path input (no MLP).
        x_surgery = x
        for block in blocks[n_plain:]:
            x_surgery = x_surgery + self._vv_attention(block, x)
            x = run_block(block, x)
        tokens = torch.cat([x[:, :1], x_surgery[:, 1:]], dim=1)  # CLS from the normal path
        tokens = visual.ln_post(tokens) @ visual.proj  # [B, 1 + N, E]
        return tokens.float()

    # ----------------------------------------------------------------- text side
    @torch.no_grad()
    def text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """L2-normalised CLIP features of ``["a", prompt.format(name)]`` per name: ``[B, 2, E]``."""
        device = self.clip.visual.conv1.weight.device
        class_texts = [self.prompt.format(n) for n in class_names]
        todo = [t for t in dict.fromkeys(["a"] + class_texts) if t not in self._text_cache]
        if todo:
            tokens = self.tokenizer(todo).to(device)  # [n, context]
            feats = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)  # [n, E]
            self._text_cache.update(zip(todo, feats))
        # Cached features may sit on another device (cached before the model moved): bring each here.
        dummy = self._text_cache["a"].to(device)  # the dummy class feature surgery subtracts against
        return torch.stack([torch.stack([dummy, self._text_cache[t].to(device)]) for t in class_texts])

    # ----------------------------------------------------------------- surgery + mask
    @torch.no_grad()
    def relevance(self, images: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """Feature-surgery relevance of every patch to its image's class: ``[B, N]``."""
        class_names = list(class_names)
        if len(class_names) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(class_names)} class names")
        feats = self.image_tokens(images)  # [B, 1 + N, E]
        feats = F.normalize(feats, dim=1 if self.feature_norm == "token" else -1)
        text = self.text_features(class_names).to(feats)  # [B, 2, E]: ("a", class)

        prob = torch.einsum("be,bte->bt", feats[:, 0], text)  # [B, 2] CLS-text similarity
        w = (2 * prob).softmax(dim=-1)
        w = w / w.mean(dim=-1, keepdim=True)  # [B, 2]
        g = feats[:, :, None, :] * text[:, None, :, :] * w[:, None, :, None]  # [B, 1 + N, 2, E]
        g = g - g.mean(dim=2, keepdim=True)  # remove what the texts share
        similarity = g.sum(dim=-1)  # [B, 1 + N, 2]
        return similarity[:, 1:, -1]  # [B, N] patches vs. the class text

    @torch.no_grad()
    def mask_from_relevance(self, relevance: torch.Tensor) -> torch.Tensor:
        """Keep-mask ``[B, N]`` (1 kept): the ``num_masked`` least relevant patches get 0."""
        order = torch.sort(relevance, dim=1, stable=True).indices  # ascending; ties by index
        mask = torch.ones_like(relevance)
        mask.scatter_(1, order[:, :self.num_masked], 0.0)
        return mask

    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        return self.mask_from_relevance(self.relevance(images, class_names))  # [B, N]

    def extra_repr(self) -> str:
        return (f"keep_ratio={self.keep_ratio}, prompt={self.prompt!r}, feature_norm={self.feature_norm!r}, "
                f"input_norm={self.input_norm!r}, surgery_depth={self.surgery_depth}")

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_pretrained(cls, path: str, *, model_name: str = CLIP_MODEL_NAME, model_cfg: Optional[dict] = None,
                        **kwargs) -> "VxLSampler":
        """Sampler on an OpenAI-format CLIP checkpoint (state dict or TorchScript archive).

        ``path == "openai"`` downloads OpenAI's weights through open_clip (needs internet).
        ``model_cfg`` (an ``open_clip.CLIP`` config dict) overrides ``model_name``'s config.
        """
        import open_clip
        if os.fspath(path) == "openai":
            try:
                model = open_clip.create_model(model_name, pretrained="openai", precision="fp32", device="cpu")
            except Exception as e:
                raise WeightLoadError(
                    f"could not download OpenAI's CLIP weights for {model_name} ({type(e).__name__}: {e}). "
                    f"Without internet pass a local file: --clip_weights /path/to/ViT-B-16.pt") from e
            quick_gelu = True
        else:
            state_dict = _read_openai_checkpoint(os.fspath(path))
            _check_is_clip(state_dict, model_name, model_cfg, os.fspath(path))  # before it is asked its activation
            model_name, cfg, quick_gelu = _clip_config_for(os.fspath(path), state_dict, model_name, model_cfg)
            model = open_clip.CLIP(**cfg)
            load_openai_state_dict(model, state_dict, source=os.fspath(path))
            _logger.info("VxL sampler: loaded the CLIP weights of %s into %s (%s)", path,
                         "a custom config" if model_cfg is not None else model_name, _activation(quick_gelu))
        _check_activation(model, quick_gelu, str(path))
        return cls(model.float().eval(), open_clip.get_tokenizer(model_name), **kwargs)

    @classmethod
    def tiny(cls, image_size: Optional[int] = None, patch_size: Optional[int] = None, seed: int = RANDOM_CLIP_SEED,
             **kwargs) -> "VxLSampler":
        """Sampler on a tiny, seeded random CLIP (CPU tests, the ``tiny`` preset); sizes None: the preset's."""
        import open_clip
        kwargs.setdefault("surgery_depth", TINY_SURGERY_DEPTH)
        return cls(build_tiny_clip(image_size=image_size, patch_size=patch_size, seed=seed),
                   open_clip.get_tokenizer(CLIP_MODEL_NAME), **kwargs)


def _copy_clip_cfg(cfg: dict) -> dict:
    """A copy of an open_clip config whose sub-dicts (vision_cfg, text_cfg) can be changed."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}


def tiny_clip_cfg(image_size: Optional[int] = None, patch_size: Optional[int] = None) -> dict:
    """The tiny preset's CLIP config, with another input or patch size where given."""
    cfg = _copy_clip_cfg(TINY_CLIP_CFG)
    cfg["vision_cfg"].update({k: v for k, v in (("image_size", image_size), ("patch_size", patch_size))
                              if v is not None})
    return cfg


def build_random_clip(cfg: dict, seed: int = RANDOM_CLIP_SEED) -> nn.Module:
    """An open_clip CLIP of config ``cfg`` with seeded random weights (the global RNG is left untouched)."""
    import open_clip
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator (the one module init draws from, and the one fork_rng restores):
        # torch.manual_seed would also reset every CUDA generator to this seed, for good.
        torch.default_generator.manual_seed(seed)
        model = open_clip.CLIP(**_copy_clip_cfg(cfg))
    return model.eval()


def build_tiny_clip(image_size: Optional[int] = None, patch_size: Optional[int] = None,
                    seed: int = RANDOM_CLIP_SEED) -> nn.Module:
    """The tiny preset's CLIP with seeded random weights (the global RNG is left untouched)."""
    return build_random_clip(tiny_clip_cfg(image_size, patch_size), seed)


# --------------------------------------------------------------------- OpenAI checkpoints
def _read_openai_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """State dict of an OpenAI-format CLIP file: a TorchScript archive (as OpenAI ships), a state dict, or a
    ``.safetensors`` file (open_clip's ``open_clip_model.safetensors`` on the Hugging Face hub)."""
    if not os.path.isfile(path):
        raise WeightFileNotFoundError(
            f"CLIP checkpoint not found: {path} (pass OpenAI's ViT-B-16.pt, or 'openai' to download it)")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        try:
            state_dict = torch.jit.load(path, map_location="cpu").state_dict()
        except RuntimeError:  # not a TorchScript archive: a saved state dict
            try:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise WeightMismatchError(
                    f"{path}: neither a TorchScript archive nor a PyTorch state dict ({e})") from e
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v
                      for k, v in state_dict["state_dict"].items()}
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightMismatchError(f"{path}: expected a dict of tensors (an OpenAI CLIP state dict)")
    return dict(state_dict)


def load_openai_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load an OpenAI-format CLIP state dict into an ``open_clip.CLIP``.

    OpenAI's key names are open_clip's CLIP names (open_clip's own OpenAI loader,
    ``build_model_from_openai_state_dict``, loads them as they are after dropping the
    non-weight entries), so no renaming is needed; fp16 weights are cast to the model's dtype.
    Any missing, unexpected or wrongly shaped key raises ``ValueError`` naming it.
    """
    target = model.state_dict()
    state_dict = _check_clip_keys(target, state_dict, source)
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in state_dict.items()}, strict=True)


def _check_is_clip(state_dict: Dict[str, torch.Tensor], model_name: str, model_cfg: Optional[dict],
                   source: str) -> None:
    """WeightMismatchError unless ``state_dict`` has the keys and shapes of the CLIP ``model_cfg`` (or open_clip's
    ``model_name``), read off the model built on the meta device (no weights)."""
    import open_clip

    cfg = model_cfg if model_cfg is not None else open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    with torch.device("meta"):
        target = open_clip.CLIP(**_copy_clip_cfg(cfg)).state_dict()
    _check_clip_keys(target, state_dict, source)


def _check_clip_keys(target: Dict[str, torch.Tensor], state_dict: Dict[str, torch.Tensor],
                     source: str) -> Dict[str, torch.Tensor]:
    """``state_dict`` without OpenAI's non-weight entries when it has exactly the keys and shapes of ``target``;
    WeightMismatchError naming the first that differ otherwise."""
    state_dict = {k: v for k, v in state_dict.items() if not (k in _OPENAI_NON_WEIGHT_KEYS and k not in target)}
    for key, value in state_dict.items():
        if key in target and value.shape != target[key].shape:
            raise WeightMismatchError(f"{source}: key {key!r} has shape {tuple(value.shape)} in the checkpoint but "
                                      f"{tuple(target[key].shape)} in the CLIP model (is it a ViT-B/16 checkpoint?)")
    missing = sorted(set(target) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(target))
    if missing or unexpected:
        raise WeightMismatchError(f"{source}: not an OpenAI-format CLIP checkpoint of this architecture (its keys: "
                                  f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                                  f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''})")
    return state_dict


def open_clip_config_beside(path: str) -> str:
    """Where open_clip's Hugging Face repositories keep a checkpoint's model configuration: beside it."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), OPEN_CLIP_CONFIG_FILE)


def clip_file_activation(path: str, state_dict: Dict[str, torch.Tensor]) -> tuple[Optional[bool], str]:
    """``(quick_gelu, why)`` of the CLIP weights read from ``path``: True for QuickGELU, False for GELU, None when
    the file does not say. Weights carry no activation: OpenAI's release (a TorchScript archive or a state dict,
    both with OpenAI's ``input_resolution``/``context_length``/``vocab_size`` entries) is QuickGELU; open_clip's
    checkpoints (LAION's and most others) state it in the ``open_clip_config.json`` their Hugging Face repository
    keeps beside them (``quick_gelu``, GELU when absent)."""
    if any(key in state_dict for key in _OPENAI_RELEASE_KEYS):
        return True, "OpenAI's release (its entries input_resolution, context_length, vocab_size)"
    config_path = open_clip_config_beside(path)
    if not os.path.isfile(config_path):
        return None, (f"neither OpenAI's release (none of its entries {list(_OPENAI_RELEASE_KEYS)}) nor beside an "
                      f"{OPEN_CLIP_CONFIG_FILE}")
    try:
        with open(config_path) as f:
            model_cfg = json.load(f).get("model_cfg", {})
    except (OSError, ValueError, AttributeError) as e:
        raise WeightMismatchError(f"{config_path}: not an open_clip model configuration ({e})") from None
    return bool(model_cfg.get("quick_gelu", False)), f"so says {config_path}"


def _clip_config_for(path: str, state_dict: Dict[str, torch.Tensor], model_name: str,
                     model_cfg: Optional[dict]) -> tuple[str, dict, bool]:
    """``(open_clip model name, its config, quick_gelu)`` to load the CLIP file ``path`` into: ``model_cfg`` when
    given (refused when the file says another activation), else ``model_name`` with the file's activation
    (``ViT-B-16`` or ``ViT-B-16-quickgelu``). A file that does not say its activation is refused."""
    import open_clip

    quick_gelu, why = clip_file_activation(path, state_dict)
    if model_cfg is not None:
        wanted = bool(model_cfg.get("quick_gelu", False))
        if quick_gelu is not None and quick_gelu != wanted:
            raise WeightMismatchError(f"{path}: {_activation(quick_gelu)} weights ({why}), the model's config uses "
                                      f"{_activation(wanted)}")
        return model_name, model_cfg, wanted
    if quick_gelu is None:
        raise WeightMismatchError(
            f"{path}: a CLIP state dict that does not say whether it was trained with QuickGELU (OpenAI's ViT-B/16) "
            f"or GELU (LAION's): it is {why}. Pass OpenAI's ViT-B-16.pt as released, or put the "
            f"{OPEN_CLIP_CONFIG_FILE} of the weights' Hugging Face repository next to the file")
    name = model_name.removesuffix(QUICKGELU_SUFFIX) + (QUICKGELU_SUFFIX if quick_gelu else "")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {name!r}")
    _logger.info("VxL sampler: %s has %s weights (%s): open_clip's %s", path, _activation(quick_gelu), why, name)
    return name, cfg, quick_gelu


def _activation(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def _check_activation(model: nn.Module, quick_gelu: bool, source: str) -> None:
    from open_clip.transformer import QuickGELU
    act = model.visual.transformer.resblocks[0].mlp.gelu
    if isinstance(act, QuickGELU) != quick_gelu:
        raise WeightMismatchError(f"{source}: {_activation(quick_gelu)} weights, the model uses {type(act).__name__} "
                                  f"(OpenAI's need open_clip's '{CLIP_MODEL_NAME}', not 'ViT-B-16')")


def sampler_keywords(settings: dict) -> dict:
    """The sampler settings (``utils.config.SAMPLER_SETTINGS``, train.py's names) as ``VxLSampler``'s keywords."""
    renamed = {"vxl_norm": "feature_norm", "clip_input_norm": "input_norm"}
    return {renamed.get(name, name): value for name, value in settings.items()}


def build_vxl_sampler(arch: str, clip_weights: Optional[str] = None, *, keep_ratio: float = ModelConfig.keep_ratio,
                      prompt: str = ModelConfig.prompt, vxl_norm: str = ModelConfig.vxl_norm,
                      clip_input_norm: str = ModelConfig.clip_input_norm) -> VxLSampler:
    """The sampler of preset ``arch`` (``utils.presets.ARCHITECTURES[arch].sampler``) with the run's settings:
    ``b16`` needs OpenAI's CLIP ViT-B/16, ``tiny`` uses a random tiny CLIP (or ``clip_weights``, a checkpoint of
    that tiny CLIP)."""
    cfg = get_architecture(arch).sampler
    kwargs = dict(surgery_depth=cfg.surgery_depth, **sampler_keywords(
        dict(keep_ratio=keep_ratio, prompt=prompt, vxl_norm=vxl_norm, clip_input_norm=clip_input_norm)))
    if cfg.random_clip is None:  # pretrained weights only
        if clip_weights is None:
            raise WeightMismatchError(f"the {arch} model needs OpenAI's CLIP ViT-B/16 for its VxL sampler: pass "
                                      "--clip_weights PATH (OpenAI's ViT-B-16.pt) or --clip_weights openai to "
                                      "download it")
        return VxLSampler.from_pretrained(clip_weights, model_name=cfg.clip_model, **kwargs)
    if clip_weights is not None:
        return VxLSampler.from_pretrained(clip_weights, model_name=cfg.clip_model,
                                          model_cfg=_copy_clip_cfg(cfg.random_clip), **kwargs)
    import open_clip
    return VxLSampler(build_random_clip(cfg.random_clip), open_clip.get_tokenizer(cfg.clip_model), **kwargs)


def sampler_for(model: ModelConfig) -> VxLSampler:
    """The VxL sampler of a run's model settings: the one ``models.build_model`` builds and the mask tools use."""
    return build_vxl_sampler(model.arch, model.clip_weights, **model.sampler_settings())
