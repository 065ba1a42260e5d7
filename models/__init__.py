"""PuXIM models: the encoder, the VxL sampler, the interaction head and their composition.

``build_model(args)`` is the one place that reads an ``args`` object; the classes take typed
keyword arguments.
"""
from __future__ import annotations

from dataclasses import asdict

from utils.presets import PRESETS, sampler_options

from .class_head import SeenClassHead
from .encoder import ENCODER_PRESETS, SketchPhotoEncoder, build_encoder, load_vit_weights
from .interaction import InteractionHead
from .puxim import PuXIM
from .training_aids import PuXIMWithPseudoSketches, PuXIMWithSeenClassHead, PuXIMWithTrainingAids, puxim_class
from .vxl_sampler import VxLSampler, build_vxl_sampler, sampler_keywords

__all__ = [
    "ENCODER_PRESETS", "INTERACTION_PRESETS", "PuXIM", "SketchPhotoEncoder", "VxLSampler", "InteractionHead",
    "SeenClassHead", "PuXIMWithPseudoSketches", "PuXIMWithSeenClassHead", "PuXIMWithTrainingAids",
    "build_model", "build_encoder", "build_vxl_sampler", "load_vit_weights", "model_summary", "compile_model",
]

# The PMM-int decoder of each preset (utils.presets.PRESETS: the paper's, b16, and a small CPU version, tiny),
# as keyword dicts. A snapshot kept for importers; build_model reads PRESETS.
INTERACTION_PRESETS = {name: asdict(p.interaction) for name, p in PRESETS.items()}

VARIANTS = ("puxim", "non-mask")


def _arg(args, name: str, default):
    """``args.name``, or ``default`` when it is missing or None (argparse's unset value)."""
    value = getattr(args, name, None)
    return default if value is None else value


def build_model(args, with_sampler: bool = True) -> PuXIM:
    """Build PuXIM from parsed arguments (see train.py), every field optional with its default.

    Fields: ``arch`` (a preset of ``utils.presets.PRESETS``: "b16" | "tiny"), ``vit_weights``,
    ``clip_weights`` (paths or None), ``keep_ratio``, ``prompt``, ``vxl_norm`` ("token" | "channel"),
    ``clip_input_norm`` ("encoder" | "clip") (unset: the preset's sampler's), ``separate_encoders`` (False),
    ``int_memory`` ("masked" | "unmasked"), ``variant`` ("puxim" | "non-mask"),
    ``dropout`` (None: the preset's, 0.1 for b16 and 0 for tiny; otherwise used by the encoder and
    the interaction head),
    ``stem_norm`` (None: the preset's, "none" for b16 and "batch" for tiny),
    ``ln_eps`` (None: the preset's 1e-6, timm's; 1e-5 is the released ViT's; checkpoints saved before
    the flag existed have none and rebuild with 1e-6, as they were trained),
    ``input_norm`` (None: the preset's, "none" for b16 and "photo" for tiny; args without the field, as
    checkpoints saved before it existed carry, rebuild with "none", as they were trained),
    ``pseudo_sketch`` (None or False: the batches carry no pseudo-sketches; True: they do, and the model
    encodes them with the sketches, ``models.training_aids.PuXIMWithPseudoSketches``),
    ``w_cls`` (None or 0: no class head; > 0: a ``SeenClassHead`` over ``num_seen_classes`` classes,
    which train.py sets from the training data and checkpoints keep in their args; without
    ``num_seen_classes`` no head is built: enough for embeddings and masks, and the criterion then
    says that the seen-class loss lacks its logits).

    The class is the paper's ``PuXIM`` unless the run has a training aid (``models.training_aids``).
    ``with_sampler=False`` skips the VxL sampler (and so needs no CLIP weights): enough for
    ``encode`` at test time, or for training on precomputed ``batch["photo_mask"]``.
    """
    arch = _arg(args, "arch", "b16")
    if arch not in PRESETS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {sorted(PRESETS)}")
    variant = _arg(args, "variant", "puxim")
    if variant not in VARIANTS:
        raise ValueError(f"unknown --variant {variant!r}; choose one of {VARIANTS}")
    int_memory = _arg(args, "int_memory", "masked")
    if int_memory not in ("masked", "unmasked"):
        raise ValueError(f"--int_memory must be 'masked' or 'unmasked', got {int_memory!r}")

    use_mask = variant == "puxim"
    sampler = None
    if use_mask and with_sampler:
        sampler = build_vxl_sampler(
            arch, _arg(args, "clip_weights", None),
            **sampler_keywords(sampler_options(args, arch)),
        )
    # The encoder after the sampler: a missing --clip_weights fails before the slow ViT build.
    encoder = _build_encoder(args, arch)
    interaction_cfg = asdict(PRESETS[arch].interaction)
    if _arg(args, "dropout", None) is not None:  # one knob for every dropout of the trained parts
        interaction_cfg["dropout"] = float(args.dropout)
    interaction = InteractionHead(**interaction_cfg)
    aids = {}
    num_classes = _arg(args, "num_seen_classes", None)
    if _arg(args, "w_cls", 0.0) > 0 and num_classes is not None:  # none known: a model for masks or embeddings only
        aids["class_head"] = SeenClassHead(embed_dim=encoder.embed_dim, num_classes=int(num_classes))
    model_class = puxim_class(pseudo_sketches=_arg(args, "pseudo_sketch", False),
                              seen_class_head="class_head" in aids)
    return model_class(encoder=encoder, interaction=interaction, sampler=sampler, use_mask=use_mask,
                       mask_memory=int_memory == "masked", **aids)


def _build_encoder(args, arch: str) -> SketchPhotoEncoder:
    """The preset's encoder with ``args``' overrides, and ``args.vit_weights`` loaded when given."""
    encoder = build_encoder(arch, separate_photo_encoder=bool(_arg(args, "separate_encoders", False)),
                            dropout=_arg(args, "dropout", None), stem_norm=_arg(args, "stem_norm", None),
                            ln_eps=_arg(args, "ln_eps", None),
                            input_norm=getattr(args, "input_norm", "none"))
    vit_weights = _arg(args, "vit_weights", None)
    if vit_weights:
        load_vit_weights(encoder, vit_weights)
    return encoder


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
    return model
