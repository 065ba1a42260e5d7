"""PuXIM models: the encoder, the VxL sampler, the interaction head and their composition.

``build_model(config)`` translates the run configuration; the classes take typed keyword arguments.
"""
from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from utils.config import ModelConfig, RunConfig
from utils.presets import get_architecture

from .class_head import SeenClassHead
from .encoder import SketchPhotoEncoder, build_encoder, check_vit_weights, load_vit_weights
from .interaction import InteractionHead
from .puxim import PuXIM
from .training_aids import PuXIMWithPseudoSketches, PuXIMWithSeenClassHead, PuXIMWithTrainingAids, puxim_class
from .vit_architecture import ln_eps_mismatch
from .vxl_sampler import VxLSampler, build_vxl_sampler, sampler_for

_logger = logging.getLogger(__name__)

__all__ = [
    "PuXIM", "SketchPhotoEncoder", "VxLSampler", "InteractionHead", "SeenClassHead", "PuXIMWithPseudoSketches",
    "PuXIMWithSeenClassHead", "PuXIMWithTrainingAids", "build_model", "build_encoder", "build_vxl_sampler",
    "load_vit_weights", "check_starting_weights", "model_summary", "compile_model", "ln_eps_mismatch",
]


def build_model(config: RunConfig, with_sampler: bool = True) -> PuXIM:
    """PuXIM as ``config`` describes it (``config.model``; the training aids that ``config.data`` and
    ``config.loss`` ask for).

    The class is the paper's ``PuXIM`` unless the run has a training aid (``models.training_aids``): the
    pseudo-sketches (``data.pseudo_sketch``) and a seen-class head (``loss.w_cls > 0`` with
    ``model.num_seen_classes``, which train.py sets from the training data; 0: a model for masks or embeddings
    only, and the criterion then says that the seen-class loss lacks its logits).
    ``with_sampler=False`` skips the VxL sampler (and so needs no CLIP weights): enough for
    ``encode`` at test time, or for training on precomputed ``batch["photo_mask"]``.
    """
    model = config.model
    architecture = get_architecture(model.arch)
    use_mask = model.variant == "puxim"
    sampler = None
    if use_mask and with_sampler:
        sampler = sampler_for(model)
    # The encoder after the sampler: a missing --clip_weights fails before the slow ViT build.
    encoder = _build_encoder(model, separate_photo_encoder=model.separate_encoders)
    if model.vit_weights:
        load_vit_weights(encoder, model.vit_weights, vit_arch=model.vit_arch, allow_partial=model.allow_partial_weights)
    interaction = InteractionHead(**asdict(architecture.interaction), dropout=model.dropout)
    aids = {}
    if config.loss.w_cls > 0 and model.num_seen_classes > 0:
        aids["class_head"] = SeenClassHead(embed_dim=encoder.embed_dim, num_classes=model.num_seen_classes)
    model_class = puxim_class(pseudo_sketches=config.data.pseudo_sketch, seen_class_head="class_head" in aids)
    return model_class(encoder=encoder, interaction=interaction, sampler=sampler, use_mask=use_mask,
                       mask_memory=model.int_memory == "masked", **aids)


def _build_encoder(model: ModelConfig, *, separate_photo_encoder: bool) -> SketchPhotoEncoder:
    return build_encoder(model.arch, separate_photo_encoder=separate_photo_encoder, dropout=model.dropout,
                         stem_norm=model.stem_norm, ln_eps=model.ln_eps, input_norm=model.input_norm,
                         vit_arch=model.vit_arch)


def check_starting_weights(config: RunConfig) -> None:
    """Refuse ``--vit_weights`` that the encoder would refuse (not a state dict, keys of another architecture,
    other shapes) before anything slow is done: nothing is built but the encoder's shapes, nothing downloaded.
    train.py calls it before reading any data."""
    model = config.model
    if not model.vit_weights:
        return
    with torch.device("meta"):  # the keys and shapes, without initialising 86M weights
        encoder = _build_encoder(model, separate_photo_encoder=False)
    check_vit_weights(encoder, model.vit_weights, vit_arch=model.vit_arch, allow_partial=model.allow_partial_weights)


def model_summary(model: PuXIM) -> dict:
    """Parameter counts: encoder (stem included), stem, frozen sampler, interaction, trainable."""
    def count(params):
        return sum(p.numel() for p in params)

    return {
        "encoder": count(model.encoder.parameters()),
        "stem": count(model.encoder.stem_parameters()),
        "sampler_frozen": count(model.sampler.parameters()) if model.sampler is not None else 0,
        "interaction": count(model.interaction.parameters()),
        "trainable": count(model.trainable_parameters()),
    }


def compile_model(model: PuXIM, *, backend: str = "inductor", mode: str | None = None) -> PuXIM:
    """``torch.compile`` the trained parts (encoder, interaction head) in place and return the model.

    ``nn.Module.compile`` compiles a module's call without wrapping it, so parameter names, the
    state dict and so every checkpoint stay those of the uncompiled model. The frozen VxL sampler
    stays eager: its text-embedding cache is Python state that compilation would keep re-tracing.
    """
    model.encoder.compile(backend=backend, mode=mode)
    model.interaction.compile(backend=backend, mode=mode)
    _logger.info("torch.compile (%s) on the encoder and the interaction head: the first steps trace and compile, "
                 "later steps run the compiled code.", backend)
    return model
