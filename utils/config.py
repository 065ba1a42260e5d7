"""The run configuration: every setting of a training run, declared once.

:class:`RunConfig` groups five dataclasses, :class:`DataConfig`, :class:`ModelConfig`, :class:`LossConfig`,
:class:`OptimConfig` and :class:`RuntimeConfig`. Each field is declared with :func:`setting`: its default (the
paper's recipe, the ``b16`` preset), its help, its choices, its command-line form and its resume policy
(:data:`DEFINES`, :data:`RESUMABLE` or :data:`IGNORED`). From these declarations come train.py's parser (flat
flag names, unique across the groups: ``--batch_size``, not ``--optim.batch_size``), the reading of config files
and saved runs, and the ``--resume`` check. A preset (``utils.presets.PRESETS``) is a complete ``RunConfig``.

Where a value comes from, last wins: the preset of ``--arch``, a ``--config`` file (YAML or JSON, grouped or
flat; an earlier run's ``args.json`` is one), the command line. A few defaults follow other settings unless
given (:func:`derive`): the preset follows ``--data_path``, the split ``--dataset``, the triplet distance
``--variant``, the margin the distance, the pseudo-sketches the instance-loss weight, the encoder's architecture a
timm tag in ``--vit_weights``, the starting weights a ``--vit_arch`` tag given alone, the LayerNorm eps the
architecture.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from utils.runtime import UserError

__all__ = ["RunConfig", "DataConfig", "ModelConfig", "LossConfig", "OptimConfig", "RuntimeConfig", "ConfigError",
           "DEFINES", "RESUMABLE", "IGNORED", "GROUPS", "setting", "config_fields", "make_config", "derive",
           "validate", "add_config_flags", "parse_config", "read_config_file", "config_from_saved",
           "config_from_checkpoint", "resume_differences"]

DEFINES = "defines"  # another value makes another run: --resume refuses it
RESUMABLE = "resumable"  # may change on --resume (the change is logged): schedule length, speed, logging, hardware
IGNORED = "ignored"  # where the run lives and how it reports: never compared
POLICIES = (DEFINES, RESUMABLE, IGNORED)

VARIANTS = ("puxim", "non-mask")  # non-mask: the ablation without VxL masking
INT_MEMORIES = ("masked", "unmasked")
VXL_NORMS = ("token", "channel")
CLIP_INPUT_NORMS = ("encoder", "clip")
STEM_NORMS = ("none", "batch")
INPUT_NORMS = ("none", "photo")
AUGMENTATIONS = ("none", "crop_flip")
TRIPLET_DISTANCES = ("euclidean", "cosine")
MARGIN_BY_DISTANCE = {"euclidean": 1.0, "cosine": 0.2}  # PuXIM's; the released non-mask ablation's
ON_COLLAPSE = ("warn", "stop")
DEVICES = ("auto", "cuda", "cpu")
AMP_MODES = ("auto", "none", "bf16", "fp16")
# The CUDA-graph modes (reduce-overhead, max-autotune) are left out: evaluation keeps embeddings across calls,
# which a graph replay overwrites.
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
# The VxL sampler's settings: what the masks depend on besides the CLIP (the mask cache's key, the mask tools).
SAMPLER_SETTINGS = ("keep_ratio", "prompt", "vxl_norm", "clip_input_norm")
# The encoder's architecture without --vit_arch: timm's plain ViT, what every run before --vit_arch built.
DEFAULT_VIT_ARCH = "vit_base_patch16_224"
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


class ConfigError(UserError):
    """A configuration that cannot be read or is not allowed; printed as one line, exit status 2."""


def setting(default, help: str, *, policy: str, choices=None, cli: Optional[str] = "option", files: bool = True):
    """A configuration field. ``choices``: a tuple, or a function giving one (looked up when needed).
    ``cli``: "option" (``--name VALUE``), "store_true" (``--name``), "bool" (``--name`` / ``--no-name``) or
    None (not a flag). ``files=False``: an action of one command (``--resume``), not read from config files."""
    assert policy in POLICIES, policy
    return field(default=default, metadata=dict(help=help, policy=policy, choices=choices, cli=cli, files=files))


def _dataset_names() -> tuple:
    from datasets.benchmarks import DATASET_ALIASES, DATASETS

    return tuple(DATASETS) + tuple(DATASET_ALIASES)


def _test_classes() -> tuple:
    from datasets.benchmarks import DATASETS

    return tuple(dict.fromkeys(name for splits in DATASETS.values() for name in splits))


def _preset_names() -> tuple:
    from utils.presets import PRESETS

    return tuple(PRESETS)


@dataclass(frozen=True)
class DataConfig:
    data_path: Optional[str] = setting(
        None, "dataset root holding Sketchy/, TUBerlin/, QuickDraw/; none: the built-in synthetic benchmark",
        policy=DEFINES)
    dataset: str = setting("sketchy_extend", "benchmark under --data_path (sketchy_am: Sketchy-AM)",
                           choices=_dataset_names, policy=DEFINES)
    test_class: str = setting(
        "test_class_sketchy25", "the zero-shot split (sketchy25=zeroshot1, sketchy21=zeroshot0, ...: docs/data.md); "
        "unless given, the dataset's first", choices=_test_classes, policy=DEFINES)
    custom_split: bool = setting(
        False, "your own split: take the unseen classes from cname_cid_zero.txt without checking them against "
        "the canonical list of --test_class", cli="store_true", policy=DEFINES)
    datasetLen: int = setting(5000, "sampled triplets per epoch (b16's: the released code's)", policy=DEFINES)
    testall: bool = setting(True, "evaluate on all unseen sketches and photos (--no-testall with --eval_per_class)",
                            cli="bool", policy=DEFINES)
    eval_per_class: Optional[int] = setting(
        None, "quick validation: at most this many queries and gallery photos per class", policy=DEFINES)
    synthetic_dir: Optional[str] = setting(
        None, "cache folder of the synthetic benchmark; none: $PUXIM_CACHE or ~/.cache/puxim of the machine that "
        "runs (left unresolved so that a saved run reruns on another machine)", policy=IGNORED)
    image_size: int = setting(224, "input size", policy=DEFINES)
    augment: str = setting(
        "none", "training images: none (the paper's) or crop_flip (each image of a triplet its own random square "
        "crop of 60-100%% of its area and a left-right flip half the time)", choices=AUGMENTATIONS, policy=DEFINES)
    pseudo_sketch: bool = setting(
        False, "training triplets also carry the positive photo's outlines drawn as a sketch, for the instance "
        "loss (--w_inst); unless given, on when --w_inst > 0", cli="bool", policy=DEFINES)
    num_workers: int = setting(2, "data-loading processes", policy=RESUMABLE)
    max_bad_fraction: float = setting(
        0.01, "unreadable training images are skipped and listed in bad_files.txt; stop when more than this "
        "fraction of draws fail", policy=RESUMABLE)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = setting("b16", "the preset (utils.presets): b16 = the paper's ViT-B/16 with OpenAI's CLIP ViT-B/16 "
                        "sampler and the released recipe; tiny = a small ViT trained from scratch on a CPU with a "
                        "random tiny CLIP. Unless given: tiny without --data_path, else b16",
                        choices=_preset_names, policy=DEFINES)
    vit_weights: Optional[str] = setting(
        "vit_base_patch16_224.orig_in21k", "starting ViT: a local timm-format .safetensors/.pth, a timm tag "
        "(downloaded only if online), or none (from scratch); unless given, a --vit_arch tag given alone names the "
        "weights, e.g. --vit_arch vit_base_patch16_clip_quickgelu_224.openai starts from OpenAI's CLIP tower",
        policy=IGNORED)
    vit_arch: Optional[str] = setting(
        "vit_base_patch16_224.orig_in21k", "timm architecture of the starting ViT, built with its pre-norm, "
        "activation and LayerNorm eps (docs/starting_points.md); name it for a --vit_weights file, e.g. "
        "vit_base_patch16_clip_quickgelu_224.openai for OpenAI's CLIP tower. Unless given, a --vit_weights tag's; "
        "none: timm's plain ViT (vit_base_patch16_224)", policy=DEFINES)
    allow_partial_weights: bool = setting(
        False, "load a --vit_weights file that does not fit the encoder anyway: the matching keys load, the others "
        "keep their init and are listed as warnings (without it: refused)", cli="store_true", policy=IGNORED)
    clip_weights: Optional[str] = setting(
        None, "CLIP ViT-B/16 file in OpenAI's key names (a .pt/.bin state dict, .safetensors or TorchScript), or "
        "'openai' to download: OpenAI's release loads with QuickGELU, another file with the activation its "
        "open_clip_config.json beside it says (LAION's: GELU), a file that says none is refused; tiny: a fixed "
        "random tiny CLIP when none",
        policy=DEFINES)
    variant: str = setting("puxim", "non-mask = the ablation without VxL masking (cosine triplet, margin 0.2)",
                           choices=VARIANTS, policy=DEFINES)
    keep_ratio: float = setting(0.3, "fraction of patches the VxL mask keeps", policy=DEFINES)
    prompt: str = setting("{}", "text template for the class name; paper figure: 'a photo of {}'", policy=DEFINES)
    vxl_norm: str = setting("token", "L2 axis of CLIP Surgery features (released code: token axis)",
                            choices=VXL_NORMS, policy=DEFINES)
    clip_input_norm: str = setting("encoder", "photo normalisation seen by CLIP (released code: the encoder's "
                                   "0.5/0.5)", choices=CLIP_INPUT_NORMS, policy=DEFINES)
    int_memory: str = setting("masked", "interaction decoder memory: masked photo tokens (paper) or unmasked "
                              "(released code)", choices=INT_MEMORIES, policy=DEFINES)
    separate_encoders: bool = setting(False, "untied sketch and photo encoders", cli="store_true", policy=DEFINES)
    vxl_cache: Optional[str] = setting(
        None, "precomputed VxL masks (python -m tools.precompute_masks ... --out FILE): training then runs no CLIP; "
        "a cache made with other settings is refused", policy=IGNORED)
    dropout: float = setting(0.1, "dropout of the encoder and the interaction decoder (b16's: the paper's)",
                             policy=DEFINES)
    stem_norm: str = setting("none", "BatchNorm after each conv of the encoder's stem (none: the paper's; batch "
                             "keeps the from-scratch tiny ViT from collapsing)", choices=STEM_NORMS, policy=DEFINES)
    input_norm: str = setting("none", "standardise each photo on its own before the encoder (its channel means "
                              "removed, divided by its std); none: the paper's", choices=INPUT_NORMS, policy=DEFINES)
    ln_eps: float = setting(1e-6, "eps of the encoder's LayerNorms; unless given, --vit_arch's (timm's ViTs: 1e-6, "
                            "CLIP's: 1e-5); 1e-5 is also the released ViT's, torch's default", policy=DEFINES)
    num_seen_classes: int = setting(0, "size of the seen-class head: set from the training data", cli=None,
                                    policy=DEFINES)

    def sampler_settings(self) -> dict:
        """The VxL sampler's settings (:data:`SAMPLER_SETTINGS`), by their flag names."""
        return {name: getattr(self, name) for name in SAMPLER_SETTINGS}


@dataclass(frozen=True)
class LossConfig:
    tri_distance: str = setting("euclidean", "distance of the triplet loss (euclidean: the paper's); unless given, "
                                "cosine for --variant non-mask", choices=TRIPLET_DISTANCES, policy=DEFINES)
    margin: float = setting(1.0, "triplet margin; unless given, 1.0 for euclidean and 0.2 for cosine",
                            policy=DEFINES)
    w_tri: float = setting(1.0, "weight of the triplet loss", policy=DEFINES)
    w_rec: float = setting(0.05, "weight of the PMM reconstruction loss", policy=DEFINES)
    w_int: float = setting(0.1, "weight of the PMM interaction loss", policy=DEFINES)
    w_cls: float = setting(0.0, "weight of a cross-entropy over the seen classes on the CLS embeddings, not the "
                           "paper's (0: none)", policy=DEFINES)
    w_inst: float = setting(0.0, "weight of an instance loss between each positive photo's outlines drawn as a "
                            "sketch and the photo (InfoNCE over the batch), not the paper's (0: none)", policy=DEFINES)


@dataclass(frozen=True)
class OptimConfig:
    epoch: int = setting(50, "epochs", policy=RESUMABLE)
    batch_size: int = setting(2, "global batch of triplets; b16's is the released recipe's 125,000 updates: a "
                              "larger batch makes fewer updates, a schedule not validated", policy=DEFINES)
    lr: float = setting(1e-5, "Adam learning rate", policy=RESUMABLE)
    weight_decay: float = setting(1e-3, "Adam weight decay", policy=RESUMABLE)
    warmup_steps: int = setting(0, "linear learning-rate warm-up from lr/N to lr over the first N optimizer steps, "
                                "then constant (0: constant, the paper's)", policy=RESUMABLE)


@dataclass(frozen=True)
class RuntimeConfig:
    exp: str = setting("puxim", "experiment name: outputs go to OUTPUT_DIR/EXP", policy=IGNORED)
    output_dir: str = setting("results", "parent folder of experiment folders", policy=IGNORED)
    resume: bool = setting(False, "continue results/EXP from its checkpoint.pth", cli="store_true", files=False,
                           policy=IGNORED)
    overwrite: bool = setting(False, "replace an existing results/EXP (its files wait in .overwritten/ until the "
                              "first checkpoint)", cli="store_true", files=False, policy=IGNORED)
    seed: int = setting(0, "seed of the weights and the triplet stream", policy=DEFINES)
    device: str = setting("auto", "auto: CUDA when available, else CPU with a warning", choices=DEVICES,
                          policy=IGNORED)
    gpu: str = setting("0", "CUDA device index for single-process runs (torchrun sets it)", policy=IGNORED)
    amp: str = setting("auto", "mixed precision on CUDA (auto: bf16 where supported); fp32 on CPU",
                       choices=AMP_MODES, policy=RESUMABLE)
    compile: bool = setting(False, "torch.compile the encoder and the interaction head (checkpoints stay "
                            "uncompiled)", cli="store_true", policy=RESUMABLE)
    compile_backend: str = setting("inductor", "torch.compile backend ('eager' only checks tracing)",
                                   policy=RESUMABLE)
    compile_mode: Optional[str] = setting(None, "torch.compile mode (none: torch's default; no CUDA-graph modes: "
                                          "evaluation keeps embeddings across calls)", choices=COMPILE_MODES,
                                          policy=RESUMABLE)
    eval_every: int = setting(1, "evaluate every N epochs (and after the last)", policy=RESUMABLE)
    eval_batch_size: Optional[int] = setting(
        None, "evaluation batch per process; none: 2x the per-process training batch, which depends on how many "
        "processes the run (or its resumption) has", policy=RESUMABLE)
    log_every: int = setting(10, "interval in steps of the TensorBoard step losses and health/ figures",
                             policy=RESUMABLE)
    on_collapse: str = setting(
        "warn", "when the embeddings collapse (spread ~0, or triplet loss pinned at the margin with accuracy ~0.5, "
        "for --collapse_patience steps): warn once, or save a checkpoint and exit 2", choices=ON_COLLAPSE,
        policy=RESUMABLE)
    collapse_patience: int = setting(100, "optimizer steps a collapse must last before --on_collapse acts",
                                     policy=RESUMABLE)
    no_progress: bool = setting(False, "no tqdm bars (for logs of batch jobs)", cli="store_true", policy=IGNORED)
    no_tb_images: bool = setting(False, "skip the TensorBoard retrieval/mask pictures", cli="store_true",
                                 policy=IGNORED)


GROUPS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
          "runtime": RuntimeConfig}


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def synthetic(self) -> bool:
        """No --data_path: the built-in synthetic benchmark."""
        return self.data.data_path is None

    def flat(self) -> dict:
        """``{field name: value}`` over all groups (the names are unique)."""
        return {f.name: getattr(getattr(self, group), f.name) for group, f in config_fields()}

    def to_dict(self) -> dict:
        """``{group: {field: value}}``: what args.json and checkpoints store."""
        return dataclasses.asdict(self)

    def replace(self, **flat) -> "RunConfig":
        """A copy with fields changed by their flat names; a name of no field is a KeyError."""
        by_group: dict = {}
        for name, value in flat.items():
            by_group.setdefault(FIELD_GROUP[name], {})[name] = value
        return dataclasses.replace(self, **{g: dataclasses.replace(getattr(self, g), **v) for g, v in by_group.items()})


def config_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """``(group, field)`` of every setting, in declaration order."""
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            yield group, f


FIELD_GROUP = {f.name: group for group, f in config_fields()}
FIELDS = {f.name: f for _, f in config_fields()}
_HINTS = {name: typing.get_type_hints(cls) for name, cls in GROUPS.items()}


def field_type(name: str) -> tuple[type, bool]:
    """``(base type, optional)`` of field ``name``: ``Optional[int]`` is ``(int, True)``."""
    hint = _HINTS[FIELD_GROUP[name]][name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0], True) if args else (hint, False)


def field_choices(f: dataclasses.Field) -> Optional[tuple]:
    choices = f.metadata["choices"]
    return choices() if callable(choices) else choices


# --------------------------------------------------------------------------------------------------------
# Values: checking one, deriving the defaults that follow other settings, checking a whole configuration
# --------------------------------------------------------------------------------------------------------

def coerce(name: str, value: Any, source: str) -> Any:
    """``value`` as field ``name``'s type (an int for a float field becomes a float; YAML's ``1e-5``, read as a
    string, a float), or ConfigError naming ``source``, the key and what is allowed."""
    base, optional = field_type(name)
    choices = field_choices(FIELDS[name])
    ok = value is None and optional
    if not ok and base is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not ok and base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = ok or (isinstance(value, base) and not (base is not bool and isinstance(value, bool)))
    if not ok:
        allowed = f"{base.__name__}{' or null' if optional else ''}"
        raise ConfigError(f"{source}: {name} must be {allowed}, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{source}: {name} must be one of {list(choices)}, got {value!r}")
    return value


def derive(config: RunConfig, given: set) -> RunConfig:
    """Fill the defaults that follow other settings, for the fields not in ``given``."""
    from datasets.benchmarks import resolve_split

    changes = {}
    if "test_class" not in given:
        changes["test_class"] = resolve_split(config.data.dataset, None)[1]
    distance = config.loss.tri_distance
    if "tri_distance" not in given and config.model.variant == "non-mask":
        distance = changes["tri_distance"] = "cosine"
    if "margin" not in given:
        changes["margin"] = MARGIN_BY_DISTANCE[distance]
    if "pseudo_sketch" not in given:
        changes["pseudo_sketch"] = config.loss.w_inst > 0
    changes.update(_derive_starting_point(config, given))
    return config.replace(**changes)


def is_timm_tag(source: str) -> bool:
    """Whether ``--vit_weights source`` names a timm model (downloaded through timm) rather than a file: no such
    file, no folder in it, no weight-file suffix."""
    source = os.fspath(source)
    return not (os.path.isfile(source) or os.sep in source or "/" in source or source.endswith(WEIGHT_FILE_SUFFIXES))


def vit_arch_name(vit_arch: Optional[str]) -> str:
    """timm's model name of ``vit_arch`` without its pretrained tag (the tag changes the weights, not the
    network); none: :data:`DEFAULT_VIT_ARCH`."""
    return (vit_arch or DEFAULT_VIT_ARCH).split(".", 1)[0]


def _weights_of(vit_arch: Optional[str], default: str) -> str:
    """The starting weights of a --vit_arch given without --vit_weights, whose default is the timm tag ``default``:
    the weights ``vit_arch`` names when it is a tag with a pretrained tag (``...clip_quickgelu_224.openai``: asked
    for by name), ``default`` when they fit ``vit_arch``'s network; ConfigError otherwise, rather than a run
    refused later with a hint to undo the --vit_arch."""
    if vit_arch is not None and "." in vit_arch:
        return vit_arch
    if vit_arch_name(vit_arch) == vit_arch_name(default):
        return default
    raise ConfigError(f"--vit_arch {vit_arch} without --vit_weights: --vit_weights is still the default {default}, "
                      f"weights of another network ({vit_arch_name(default)}): pass --vit_weights with a file of "
                      f"{vit_arch}'s weights, or none (from scratch); docs/starting_points.md")


def _derive_starting_point(config: RunConfig, given: set) -> dict:
    """The encoder's architecture follows a timm tag in --vit_weights, the default weights a --vit_arch given alone
    (:func:`_weights_of`), and the LayerNorm eps the architecture."""
    model, changes = config.model, {}
    vit_arch, source = model.vit_arch, "--vit_arch"
    tag = bool(model.vit_weights) and is_timm_tag(model.vit_weights)
    if "vit_arch" not in given and tag:
        vit_arch = changes["vit_arch"] = model.vit_weights
        source = "--vit_weights"
    if vit_arch is not None:  # first: an architecture the encoder cannot be built as is the error to report
        # Lazily: timm builds the architecture's model (on the meta device) only for runs that name one.
        from models.vit_architecture import VitArchitectureError, read_vit_architecture

        try:
            ln_eps = read_vit_architecture(vit_arch, source=source).ln_eps
        except VitArchitectureError as e:
            raise ConfigError(str(e)) from None
        if "ln_eps" not in given:
            changes["ln_eps"] = ln_eps
    if tag and "vit_arch" in given and "vit_weights" not in given:  # --vit_arch given alone
        weights = _weights_of(vit_arch, model.vit_weights)
        if weights != model.vit_weights:
            changes["vit_weights"] = weights
    return changes


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: RunConfig) -> RunConfig:
    """Refuse values and combinations that cannot run (ConfigError naming the flags); return ``config``."""
    data, model, loss, optim = config.data, config.model, config.loss, config.optim
    from utils.experiment import check_experiment_name

    check_experiment_name(config.runtime.exp)  # one folder inside --output_dir: --overwrite deletes only there
    _require(data.testall or data.eval_per_class is not None,
             "--no-testall needs --eval_per_class N (how many queries/photos per class)")
    flat = config.flat()
    for name in ("epoch", "batch_size", "datasetLen", "image_size"):
        _require(flat[name] > 0, f"--{name} must be positive (got {flat[name]})")
    _require(optim.warmup_steps >= 0,
             f"--warmup_steps must be >= 0 (0: a constant learning rate), got {optim.warmup_steps}")
    _require(not (model.vxl_cache and data.augment != "none"),
             f"--vxl_cache {model.vxl_cache} holds VxL masks of whole photos and --augment {data.augment} crops the "
             "photos, so the masks would not fit them: pass --augment none, or drop --vxl_cache.")
    _require(not (model.vxl_cache and model.variant == "non-mask"),
             "--vxl_cache holds VxL masks, which the non-mask variant does not use; drop one of them.")
    _require(0.0 < model.keep_ratio < 1.0, f"--keep_ratio must be in (0, 1), got {model.keep_ratio}")
    _require(loss.w_cls >= 0, f"--w_cls must be >= 0 (0 turns the seen-class loss off), got {loss.w_cls}")
    _require(loss.w_inst >= 0, f"--w_inst must be >= 0 (0 turns the instance loss off), got {loss.w_inst}")
    _require(not (loss.w_inst > 0 and not data.pseudo_sketch),
             f"--w_inst {loss.w_inst} needs the pseudo-sketches it compares with their photos: drop "
             "--no-pseudo_sketch, or pass --w_inst 0.")
    _require(model.ln_eps > 0, f"--ln_eps must be positive, got {model.ln_eps}")
    if model.vit_arch is not None:
        from models.vit_architecture import VitArchitectureError, check_fits_preset

        try:
            check_fits_preset(model.vit_arch, model.arch)
        except VitArchitectureError as e:
            raise ConfigError(str(e)) from None
    _require(loss.margin >= 0, f"--margin must be >= 0, got {loss.margin}")
    return config


def make_config(arch: Optional[str] = None, *, given: Optional[dict] = None, check: bool = True,
                **flat) -> RunConfig:
    """The complete configuration of preset ``arch`` with the flat settings ``flat`` (and ``given``) applied and
    the derived defaults filled; ``arch`` None: by ``data_path`` (tiny without, b16 with).

    ``make_config("tiny", variant="non-mask")`` is the tiny preset's non-mask ablation.
    """
    from utils.presets import get_preset

    settings = {**(given or {}), **flat}
    for name in settings:
        if name not in FIELD_GROUP:
            raise ConfigError(f"unknown setting {name!r}; settings are: {', '.join(FIELD_GROUP)}")
    if arch is None:
        arch = settings.get("arch") or ("tiny" if settings.get("data_path") is None else "b16")
    settings = {name: coerce(name, value, "configuration") for name, value in {**settings, "arch": arch}.items()}
    config = derive(get_preset(arch).replace(**settings), set(settings))
    return validate(config) if check else config


# --------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------

def _optional_str(value: str) -> Optional[str]:
    return None if value.lower() in ("none", "null") else value


def _preset_values(name: str) -> str:
    from utils.presets import PRESETS

    values = {arch: preset.flat()[name] for arch, preset in PRESETS.items()}
    if len(set(map(repr, values.values()))) == 1:
        return f"default: {next(iter(values.values()))}"
    return ", ".join(f"{arch}: {value}" for arch, value in values.items())


def add_config_flags(parser: argparse.ArgumentParser, names: Optional[set] = None) -> None:
    """One flag per setting (or per setting in ``names``), grouped; defaults are suppressed, so that the parsed
    namespace holds only what the command line gave. The help shows each preset's value."""
    for group, cls in GROUPS.items():
        g = parser.add_argument_group(group)
        for f in dataclasses.fields(cls):
            cli = f.metadata["cli"]
            if cli is None or (names is not None and f.name not in names):
                continue
            help_text = f"{f.metadata['help']} ({_preset_values(f.name)})"
            if cli == "store_true":
                g.add_argument(f"--{f.name}", action="store_true", default=argparse.SUPPRESS, help=help_text)
            elif cli == "bool":
                g.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
            else:
                base, optional = field_type(f.name)
                kind = _optional_str if (base is str and optional) else base
                choices = field_choices(f)
                g.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS, choices=choices,
                               help=help_text, metavar=f.name.upper() if choices is None else None)


def parse_config(namespace: argparse.Namespace) -> RunConfig:
    """The configuration of a parsed command line: ``--config FILE`` (when given) under the flags given."""
    given = {k: v for k, v in vars(namespace).items() if k in FIELD_GROUP}
    config_file = getattr(namespace, "config", None)
    if config_file is None:
        return make_config(given=given)
    from_file = read_config_file(config_file)
    try:
        return make_config(given={**from_file, **given})
    except ConfigError as e:  # a value the file set: name the file, as its other errors do
        if any(f"--{name} " in str(e) for name in from_file if name not in given):
            raise ConfigError(f"--config {config_file}: {e}") from None
        raise


# --------------------------------------------------------------------------------------------------------
# Files and saved runs
# --------------------------------------------------------------------------------------------------------

# Entries of saved flags that are not settings: what train.py's args.json and checkpoints of format 1 held
# besides their flags.
_SAVED_EXTRAS = ("synthetic",)


def read_config_file(path: str | Path) -> dict:
    """The flat settings of a config file: YAML or JSON, grouped (``optim: {lr: ...}``) or flat (``lr: ...``);
    an args.json (its ``config`` or ``args`` entry) too. Every key and value is checked (ConfigError)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e}).") from None
    import yaml

    try:
        content = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"--config {path} does not parse: {' '.join(str(e).split())}") from None
    return flat_settings(content, str(path), from_file=True)


# Settings that format-1 runs did not save because they did not exist yet: the value those runs had.
_FORMAT1_ABSENT = {"w_cls": 0.0, "w_inst": 0.0, "augment": "none", "input_norm": "none", "warmup_steps": 0}


def flat_settings(content: Any, source: str, *, legacy: bool = False, from_file: bool = False) -> dict:
    """Check and flatten a mapping of settings (grouped or flat, or an args.json); ``legacy``: a saved
    ``vars(args)`` of format 1, whose None meant "the preset's"; ``from_file``: a --config file, in which a
    recipe (not a saved run) may not ask for a one-command action such as ``resume``."""
    recipe = from_file
    if isinstance(content, dict) and isinstance(content.get("config"), dict):
        content, recipe = content["config"], False
    elif isinstance(content, dict) and isinstance(content.get("args"), dict):
        content, legacy, recipe = content["args"], True, False
    if not isinstance(content, dict):
        raise ConfigError(f"{source}: a configuration is a mapping of settings, got {type(content).__name__}")
    flat: dict = {}
    for key, value in content.items():
        if key in GROUPS and not isinstance(value, dict):
            raise ConfigError(f"{source}: {key!r} is a group: a mapping of its settings "
                              f"({', '.join(n for n, g in FIELD_GROUP.items() if g == key)}), got {value!r}")
        if key in GROUPS:
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    settings = {}
    for key, value in flat.items():
        name = key.split(".", 1)[-1]
        if name in _SAVED_EXTRAS:
            continue
        if name in FIELD_GROUP and "." in key and FIELD_GROUP[name] != key.split(".")[0]:
            raise ConfigError(f"{source}: key {key!r}: {name} belongs to the group {FIELD_GROUP[name]!r}")
        if name not in FIELD_GROUP:
            raise ConfigError(f"{source}: unknown key {key!r}; the settings are: {', '.join(FIELD_GROUP)}")
        if not FIELDS[name].metadata["files"]:
            if recipe and value:
                raise ConfigError(f"{source}: {key!r} is an action of one command, not a setting a file keeps: "
                                  f"pass --{name} on the command line")
            continue
        if legacy and value is None and not field_type(name)[1]:
            continue  # format 1 saved None for "the preset's value"
        settings[name] = coerce(name, value, source)
    if legacy:  # a format-1 run without a setting of later releases had that setting's value of its time
        settings = {**{k: v for k, v in _FORMAT1_ABSENT.items() if k not in flat}, **settings}
    return settings


# Settings that runs saved before they existed did not have: the value those runs had (given, so not derived).
_ABSENT_FROM_OLDER_RUNS = {"vit_arch": None}


def config_from_saved(saved: dict, source: str = "checkpoint") -> RunConfig:
    """The configuration a run saved: format 2's ``{group: {...}}``, or format 1's flat ``vars(args)``."""
    legacy = not any(isinstance(saved.get(g), dict) for g in GROUPS)
    settings = flat_settings(saved, source, legacy=legacy)
    return make_config(given={**_ABSENT_FROM_OLDER_RUNS, **settings}, check=False)


def config_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> RunConfig:
    """The configuration a checkpoint was trained with (format 2: ``config``; format 1: ``args``)."""
    if isinstance(ckpt.get("config"), dict):
        return config_from_saved(ckpt["config"], source)
    if isinstance(ckpt.get("args"), dict):
        return config_from_saved(ckpt["args"], source)
    raise ConfigError(f"{source} holds no configuration (no 'config' or 'args' entry): it was not written by "
                      "train.py; pass a checkpoint of a training run.")


def _same(name: str, ours, theirs) -> bool:
    if name == "vit_arch":  # one network: vit_base_patch16_224.augreg_in21k's is vit_base_patch16_224's
        return vit_arch_name(ours) == vit_arch_name(theirs)
    if name in ("data_path", "clip_weights") and ours is not None and theirs is not None:
        if Path(ours).resolve() == Path(theirs).resolve():
            return True
        if name == "clip_weights" and Path(ours).is_file() and Path(theirs).is_file():
            from models.vxl_cache import file_sha256  # the same CLIP file, moved

            return file_sha256(ours) == file_sha256(theirs)
        return False
    return ours == theirs


def resume_differences(config: RunConfig, saved: RunConfig) -> tuple[list, list]:
    """``(run-defining differences, resumable changes)`` of ``config`` against a run's ``saved`` one, each a list of
    ``(name, ours, theirs)``."""
    ours, theirs = config.flat(), saved.flat()
    defining, resumable = [], []
    for _, f in config_fields():
        if f.metadata["policy"] == IGNORED or _same(f.name, ours[f.name], theirs[f.name]):
            continue
        (defining if f.metadata["policy"] == DEFINES else resumable).append((f.name, ours[f.name], theirs[f.name]))
    return defining, resumable
