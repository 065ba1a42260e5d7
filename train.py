"""Train PuXIM for zero-shot sketch-based image retrieval.

    python train.py --exp NAME [--data_path ROOT --dataset sketchy_extend --test_class test_class_sketchy25]
    torchrun --nproc_per_node=4 train.py --exp NAME ...        # several GPUs (DDP)

Without ``--data_path`` it trains the ``tiny`` preset on the built-in synthetic benchmark (CPU-friendly).
Everything lands in ``results/NAME/``: args.json, train.log, log.txt (one JSON line per epoch),
tb/ (TensorBoard), checkpoint.pth (latest, atomic), best.pth (best unseen-class mAP@all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import engine
from utils import distributed as dist_utils
from utils.checkpoint import CheckpointError, strip_wrappers
from utils.experiment import (ExperimentError, RunLock, check_experiment_name, discard_overwritten,
                              prepare_output_dir, write_args_json)
from datasets.robust import BadFileLog
from datasets.transforms import AUGMENTATIONS
from utils.health import ON_COLLAPSE, HealthMonitor
from utils.logger import ExperimentLogger, setup_logging
from losses import TRIPLET_DISTANCES, default_distance
from utils.presets import INPUT_NORMS, PRESETS, default_arch, get_preset, preset_values, sampler_options
from utils.runtime import UserError, run_cli, select_amp, select_device
from utils.train_state import TrainState
from utils.visualize import mask_summary, retrieval_summary, select_items

log = logging.getLogger("train")

# The released training schedule (README "Training"): the b16 preset's (utils.presets), 2,500 updates per
# epoch and 125,000 in all; schedule_warning compares a b16 run with it.
RELEASED_RECIPE = {k: getattr(PRESETS["b16"].recipe, k) for k in ("lr", "weight_decay", "batch_size", "epoch",
                                                                   "datasetLen")}
# Per-preset defaults for flags left unset (utils.presets.RecipeConfig), as dicts: a snapshot kept for
# importers; resolve_args reads PRESETS.
ARCH_DEFAULTS = {name: asdict(p.recipe) for name, p in PRESETS.items()}
DATASETS = ("sketchy_extend", "tu_berlin", "Quickdraw", "sketchy_am")  # sketchy_am: Sketchy-AM (zeroshot2)
TEST_CLASSES = (
    "test_class_sketchy25", "test_class_sketchy21", "test_class_sketchyam",
    "test_class_tuberlin30", "test_class_quickdraw30",
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("PuXIM training", add_help=True,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_experiment_flags(p.add_argument_group("experiment"))
    _add_data_flags(p.add_argument_group("data"))
    _add_model_flags(p.add_argument_group("model"))
    _add_loss_flags(p.add_argument_group("loss"))
    _add_optimisation_flags(p.add_argument_group("optimisation"))
    _add_runtime_flags(p.add_argument_group("runtime"))
    return p


def _add_experiment_flags(g) -> None:
    g.add_argument("--exp", default="puxim", help="experiment name: outputs go to OUTPUT_DIR/EXP")
    g.add_argument("--output_dir", default="results", help="parent folder of experiment folders")
    g.add_argument("--resume", action="store_true", help="continue results/EXP from its checkpoint.pth")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing results/EXP (its files wait in .overwritten/ until the first checkpoint)")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights and the triplet stream")


def _add_data_flags(g) -> None:
    g.add_argument("--data_path", default=None,
                   help="dataset root holding Sketchy/, TUBerlin/, QuickDraw/; omit for the synthetic benchmark")
    g.add_argument("--dataset", default="sketchy_extend", choices=DATASETS, help="benchmark under --data_path")
    g.add_argument("--test_class", default=None, choices=TEST_CLASSES,
                   help="which zero-shot split (see README: sketchy25=zeroshot1, sketchy21=zeroshot0, ...); "
                        "default: the dataset's first (sketchy_extend: test_class_sketchy25, tu_berlin: "
                        "test_class_tuberlin30, Quickdraw: test_class_quickdraw30)")
    g.add_argument("--datasetLen", type=int, default=None,
                   help=f"sampled triplets per epoch ({preset_values(lambda p: p.recipe.datasetLen)}; b16's is the "
                        "released code's)")
    g.add_argument("--testall", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate on all unseen sketches and photos (--no-testall with --eval_per_class)")
    g.add_argument("--eval_per_class", type=int, default=None,
                   help="quick validation: at most this many queries and gallery photos per class")
    g.add_argument("--custom_split", action="store_true",
                   help="your own split: take the unseen classes from cname_cid_zero.txt without checking "
                        "them against the canonical list of --test_class")
    g.add_argument("--synthetic_dir", default=None, help="cache folder of the synthetic benchmark")
    g.add_argument("--image_size", type=int, default=None,
                   help=f"input size ({preset_values(lambda p: p.recipe.image_size)})")
    g.add_argument("--augment", default=None, choices=AUGMENTATIONS,
                   help="training images: none (the paper's) or crop_flip (each image of a triplet its own random "
                        f"square crop of 60-100%% of its area and a left-right flip half the time; "
                        f"{preset_values(lambda p: p.recipe.augment)})")
    g.add_argument("--num_workers", type=int, default=2, help="data-loading processes")
    g.add_argument("--max_bad_fraction", type=float, default=0.01,
                   help="unreadable training images are skipped and listed in bad_files.txt; stop when "
                        "more than this fraction of draws fail")


def _add_model_flags(g) -> None:
    g.add_argument("--arch", default=None, choices=list(PRESETS),  # read as the parser is built
                   help="preset (utils.presets): " + "; ".join(f"{n} = {p.description}" for n, p in PRESETS.items())
                        + f" (default: {default_arch(True)} without --data_path, else {default_arch(False)})")
    g.add_argument("--vit_weights", default=None,
                   help="local timm-format .safetensors/.pth, a timm tag (downloaded only if online), or 'none' "
                        f"({preset_values(lambda p: p.recipe.vit_weights or 'none')})")
    g.add_argument("--clip_weights", default=None,
                   help="OpenAI-format CLIP ViT-B/16 file (.pt state dict or TorchScript), or 'openai' to "
                        "download; tiny preset: a fixed random tiny CLIP when omitted")
    g.add_argument("--variant", default="puxim", choices=["puxim", "non-mask"],
                   help="non-mask = the ablation without VxL masking (cosine triplet, margin 0.2)")
    g.add_argument("--keep_ratio", type=float, default=None,
                   help=f"fraction of patches the VxL mask keeps ({preset_values(lambda p: p.sampler.keep_ratio)})")
    g.add_argument("--prompt", default=None,
                   help="text template for the class name; paper figure: 'a photo of {}' "
                        f"({preset_values(lambda p: repr(p.sampler.prompt))})")
    g.add_argument("--vxl_norm", default=None, choices=["token", "channel"],
                   help="L2 axis of CLIP Surgery features (released code: token axis; "
                        f"{preset_values(lambda p: p.sampler.vxl_norm)})")
    g.add_argument("--clip_input_norm", default=None, choices=["encoder", "clip"],
                   help="photo normalisation seen by CLIP (released code: the encoder's 0.5/0.5; "
                        f"{preset_values(lambda p: p.sampler.clip_input_norm)})")
    g.add_argument("--int_memory", default="masked", choices=["masked", "unmasked"],
                   help="interaction decoder memory: masked photo tokens (paper) or unmasked (released code)")
    g.add_argument("--separate_encoders", action="store_true", help="untied sketch and photo encoders")
    g.add_argument("--vxl_cache", default=None,
                   help="precomputed VxL masks (python -m tools.precompute_masks ... --out FILE): "
                        "training then runs no CLIP at all; a cache made with other settings is refused")
    g.add_argument("--dropout", type=float, default=None,
                   help="dropout of the encoder and the interaction decoder "
                        f"({preset_values(lambda p: p.encoder.dropout)}; b16's is the paper's)")
    g.add_argument("--stem_norm", default=None, choices=["none", "batch"],
                   help="BatchNorm after each conv of the encoder's stem "
                        f"({preset_values(lambda p: p.encoder.stem_norm)}; none is the paper's, batch keeps the "
                        "from-scratch tiny ViT from collapsing)")
    g.add_argument("--input_norm", default=None, choices=list(INPUT_NORMS),
                   help="standardise each photo on its own before the encoder (its channel means removed, divided "
                        f"by its std) ({preset_values(lambda p: p.encoder.input_norm)}; none is the paper's)")
    g.add_argument("--ln_eps", type=float, default=None,
                   help=f"eps of the encoder's LayerNorms ({preset_values(lambda p: p.encoder.ln_eps)}, timm's; "
                        "1e-5 is the released ViT's, torch's default)")


def _add_loss_flags(g) -> None:
    g.add_argument("--tri_distance", default=None, choices=TRIPLET_DISTANCES,
                   help="distance of the triplet loss "
                        f"({preset_values(lambda p: p.recipe.tri_distance or 'by variant')}; by variant: euclidean, "
                        "the paper's, for --variant puxim, cosine for non-mask)")
    g.add_argument("--margin", type=float, default=None, help="triplet margin (None: 1.0 for euclidean, 0.2 for cosine)")
    g.add_argument("--w_tri", type=float, default=1.0, help="weight of the triplet loss")
    g.add_argument("--w_rec", type=float, default=0.05, help="weight of the PMM reconstruction loss")
    g.add_argument("--w_int", type=float, default=0.1, help="weight of the PMM interaction loss")
    g.add_argument("--w_cls", type=float, default=None,
                   help="weight of a cross-entropy over the seen classes on the CLS embeddings, not the paper's "
                        f"({preset_values(lambda p: p.recipe.w_cls)}; 0 = none)")
    g.add_argument("--w_inst", type=float, default=None,
                   help="weight of an instance loss between each positive photo's outlines drawn as a sketch and "
                        "the photo (InfoNCE over the batch), not the paper's "
                        f"({preset_values(lambda p: p.recipe.w_inst)}; 0 = none)")


def _add_optimisation_flags(g) -> None:
    g.add_argument("--epoch", type=int, default=None, help=f"epochs ({preset_values(lambda p: p.recipe.epoch)})")
    g.add_argument("--batch_size", type=int, default=None,
                   help=f"global batch of triplets ({preset_values(lambda p: p.recipe.batch_size)}); b16's is the "
                        "released recipe's 125,000 updates: a larger batch makes fewer updates, a schedule not "
                        "validated")
    g.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate ({preset_values(lambda p: p.recipe.lr)})")
    g.add_argument("--weight_decay", type=float, default=None,
                   help=f"Adam weight decay ({preset_values(lambda p: p.recipe.weight_decay)})")
    g.add_argument("--warmup_steps", type=int, default=None,
                   help="linear learning-rate warm-up from lr/N to lr over the first N optimizer steps, then "
                        f"constant ({preset_values(lambda p: p.recipe.warmup_steps)}; 0 = constant, the paper's)")


def _add_runtime_flags(g) -> None:
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: CUDA when available, else CPU with a warning")
    g.add_argument("--gpu", default="0", help="CUDA device index for single-process runs (torchrun sets it)")
    g.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="mixed precision on CUDA (auto: bf16 where supported); fp32 on CPU")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder and the interaction head (checkpoints stay uncompiled)")
    g.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend (inductor; 'eager' only checks tracing, without speed-up)")
    g.add_argument("--compile_mode", default=None, choices=[None, "default", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode (default: torch's default). The CUDA-graph modes (reduce-overhead, "
                        "max-autotune) are not offered: evaluation keeps embeddings across calls, which a graph "
                        "replay overwrites")
    g.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--eval_batch_size", type=int, default=None, help="default: 2x the per-process batch")
    g.add_argument("--log_every", type=int, default=10,
                   help="interval in steps of the TensorBoard step losses and health/ figures")
    g.add_argument("--on_collapse", default="warn", choices=list(ON_COLLAPSE),
                   help="when the embeddings collapse (spread ~0, or triplet loss pinned at the margin with "
                        "accuracy ~0.5, for --collapse_patience steps): warn once, or save a checkpoint and exit 2")
    g.add_argument("--collapse_patience", type=int, default=100,
                   help="optimizer steps a collapse must last before --on_collapse acts")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bars (for logs of batch jobs)")
    g.add_argument("--no_tb_images", action="store_true", help="skip the TensorBoard retrieval/mask pictures")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill flags left unset from the preset and check combinations; no side effects."""
    check_experiment_name(args.exp)  # one folder inside --output_dir: --overwrite deletes only there
    args.synthetic = args.data_path is None
    if args.test_class is None:  # the dataset's own split, so --dataset tu_berlin alone is enough
        from datasets.benchmarks import resolve_split

        args.test_class = resolve_split(args.dataset, None)[1]
    if args.arch is None:
        args.arch = default_arch(args.synthetic)
    for key, value in asdict(get_preset(args.arch).recipe).items():  # vit_weights too: b16's pretrained ViT
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, value in sampler_options(args, args.arch).items():
        setattr(args, key, value)
    if args.input_norm is None:  # resolved here, so that args.json and checkpoints name the value used
        args.input_norm = get_preset(args.arch).encoder.input_norm
    if args.tri_distance is None:  # a preset without one: the variant's
        args.tri_distance = default_distance(args.variant)
    if isinstance(args.vit_weights, str) and args.vit_weights.lower() == "none":
        args.vit_weights = None
    if isinstance(args.clip_weights, str) and args.clip_weights.lower() == "none":
        args.clip_weights = None
    if not args.testall and args.eval_per_class is None:
        raise UserError("--no-testall needs --eval_per_class N (how many queries/photos per class)")
    for name in ("epoch", "batch_size", "datasetLen", "image_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive (got {getattr(args, name)})")
    if args.warmup_steps < 0:
        raise UserError(f"--warmup_steps must be >= 0 (0: a constant learning rate), got {args.warmup_steps}")
    if args.vxl_cache and args.augment != "none":
        raise UserError(f"--vxl_cache {args.vxl_cache} holds VxL masks of whole photos and --augment {args.augment} "
                        "crops the photos, so the masks would not fit them: pass --augment none, or drop --vxl_cache.")
    if args.vxl_cache and args.variant == "non-mask":
        raise UserError("--vxl_cache holds VxL masks, which the non-mask variant does not use; drop one of them.")
    if not 0.0 < args.keep_ratio < 1.0:
        raise UserError(f"--keep_ratio must be in (0, 1), got {args.keep_ratio}")
    if args.w_cls < 0:
        raise UserError(f"--w_cls must be >= 0 (0 turns the seen-class loss off), got {args.w_cls}")
    if args.w_inst < 0:
        raise UserError(f"--w_inst must be >= 0 (0 turns the instance loss off), got {args.w_inst}")
    if args.ln_eps is not None and not args.ln_eps > 0:
        raise UserError(f"--ln_eps must be positive, got {args.ln_eps}")
    return args


def planned_updates(triplets: int, batch_size: int, epochs: int, world: int = 1) -> int:
    """Optimizer updates of a run, as build_loaders' DataLoader makes them.

    Each of ``world`` processes takes ``triplets // world`` triplets per epoch (TripletIndexSampler)
    in batches of ``batch_size // world``, the last one short (drop_last=False).
    """
    per_rank, per_batch = triplets // world, batch_size // world
    return epochs * -(-per_rank // per_batch)


def schedule_warning(args, updates: int):
    """The warning for a ``b16`` run whose schedule is not the released one, else None."""
    flags = ("batch_size", "datasetLen", "epoch")
    if args.arch != "b16" or all(getattr(args, k) == RELEASED_RECIPE[k] for k in flags):
        return None
    released = planned_updates(RELEASED_RECIPE["datasetLen"], RELEASED_RECIPE["batch_size"], RELEASED_RECIPE["epoch"])
    ratio = released / updates
    travel = f"about {ratio:.3g} times less far" if ratio >= 1 else f"about {1 / ratio:.3g} times further"
    restore = " ".join(f"--{k} {RELEASED_RECIPE[k]}" for k in flags if getattr(args, k) != RELEASED_RECIPE[k])
    return (f"this schedule makes {updates:,} optimizer updates against the released {released:,} (batch "
            f"{RELEASED_RECIPE['batch_size']} x {RELEASED_RECIPE['datasetLen']:,} triplets x "
            f"{RELEASED_RECIPE['epoch']} epochs); Adam's step size hardly depends on the batch, so the weights "
            f"travel {travel}. It is not the released schedule and has not been validated; {restore} restores it.")


# Flags that define the run: --resume with another value would silently make it another run
# (other data, another triplet stream, another model or objective, best.pth across two test sets).
RUN_DEFINING_FLAGS = ("data_path", "dataset", "test_class", "custom_split", "datasetLen", "testall", "eval_per_class",
                      "image_size", "arch", "variant", "keep_ratio", "prompt", "vxl_norm", "clip_input_norm",
                      "int_memory", "separate_encoders", "stem_norm", "dropout", "clip_weights", "margin", "w_tri",
                      "w_rec", "w_int", "seed", "batch_size", "ln_eps", "tri_distance", "w_cls", "w_inst",
                      "augment", "input_norm")
# Flags that may change on --resume (said in the log): schedule length, speed, logging, hardware.
RESUMABLE_FLAGS = ("epoch", "lr", "weight_decay", "warmup_steps", "amp", "compile", "compile_backend", "compile_mode",
                   "eval_every", "eval_batch_size", "log_every", "num_workers", "max_bad_fraction", "on_collapse",
                   "collapse_patience")


def check_resume_args(args, saved: dict, source: Path) -> None:
    """Refuse a --resume whose run-defining flags differ from the checkpoint's; log the other changes."""
    # Checkpoints from before a flag existed were trained with: the preset's eps, the variant's triplet
    # distance, no seen-class loss, no instance loss, no augmentation, no per-photo standardisation.
    saved = {"ln_eps": None, "tri_distance": default_distance(saved.get("variant", "puxim")), "w_cls": 0.0,
             "w_inst": 0.0, "augment": "none", "input_norm": "none", **saved}

    def same(key):
        ours, theirs = getattr(args, key, None), saved.get(key)
        if key == "ln_eps" and (ours is None) != (theirs is None):  # None is the preset's value
            preset = PRESETS.get(getattr(args, "arch", None), PRESETS["b16"]).encoder.ln_eps
            ours, theirs = (preset if ours is None else ours), (preset if theirs is None else theirs)
        if key in ("data_path", "clip_weights") and ours is not None and theirs is not None:
            if Path(ours).resolve() == Path(theirs).resolve():
                return True
            if key == "clip_weights" and Path(ours).is_file() and Path(theirs).is_file():
                from models.vxl_cache import file_sha256  # the same CLIP file, moved

                return file_sha256(ours) == file_sha256(theirs)
            return False
        return ours == theirs or (isinstance(ours, (list, tuple)) and list(ours) == list(theirs or []))

    differ = [f"--{k} {getattr(args, k, None)!r} (the run has {saved.get(k)!r})"
              for k in RUN_DEFINING_FLAGS if k in saved and not same(k)]
    if differ:
        raise UserError(f"--resume: {source} was trained with other settings; resuming with "
                        + "; ".join(differ) + " would make it another run. Resume with the run's values (see "
                        "args.json), or start a new --exp.")
    changed = [f"--{k} {getattr(args, k)!r} (was {saved[k]!r})" for k in RESUMABLE_FLAGS
               if k in saved and not same(k)]
    if changed:
        log.info("--resume with changed flags: %s", "; ".join(changed))


def build_loaders(data: dict, args, *, rank: int, world: int, device: torch.device) -> dict:
    from datasets.robust import AccountedImages, SkipBadTriplets, collate_skipping
    from datasets.sampling import TripletIndexSampler

    per_rank = args.batch_size // world  # divisible: run() checked it before anything was built
    pin = device.type == "cuda"
    workers = dict(num_workers=args.num_workers, pin_memory=pin,
                   persistent_workers=args.num_workers > 0,
                   prefetch_factor=4 if args.num_workers > 0 else None)
    sampler = TripletIndexSampler(len(data["train"]), rank=rank, world_size=world)
    # Its own generator: starting an epoch's iterator then draws no number from the global RNG (which
    # drives dropout), so a run resumed mid-epoch continues the same random stream.
    train = DataLoader(SkipBadTriplets(data["train"]), batch_size=per_rank, sampler=sampler, drop_last=False,
                       collate_fn=collate_skipping, generator=torch.Generator().manual_seed(args.seed),
                       **workers)
    eval_bs = args.eval_batch_size or 2 * per_rank

    def eval_loader(ds):
        accounted = AccountedImages(ds)  # outside the Subset: an unreadable item keeps its dataset index
        share = Subset(accounted, range(rank, len(ds), world)) if world > 1 else accounted
        return DataLoader(share, batch_size=eval_bs, shuffle=False, collate_fn=collate_skipping, **workers)

    return {"train": train, "sampler": sampler, "query": eval_loader(data["query"]),
            "gallery": eval_loader(data["gallery"])}


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop stops after the current step and a checkpoint is written. A job
    scheduler's own stop signal does the same through :meth:`request` (tools.submit)."""

    requested: str | None = None  # request()'s reason, for the run training (or starting) in this process

    def __init__(self):
        self.signal = None

    @classmethod
    def request(cls, reason: str) -> None:
        """Stop the run training in this process, or about to, after its current step, as a first SIGTERM
        does. Safe in a signal handler; a SIGTERM that follows is taken as the first signal, not a second."""
        cls.requested = cls.requested or reason

    def __call__(self) -> bool:
        if self.signal is None and StopFlag.requested:  # taken at the next poll, after a step
            self.signal = StopFlag.requested
            log.warning("%s received: finishing this step, then saving a checkpoint.", self.signal)
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """The exit status of a run it stopped: 130 after SIGINT, 143 after SIGTERM (or a signal to another rank)."""
        return 130 if self.signal == "SIGINT" else 143

    def install(self):
        def handler(signum, frame):
            if self.signal is not None and self.signal != StopFlag.requested:  # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            self.signal = signal.Signals(signum).name
            log.warning("%s received: finishing this step, then saving a checkpoint.", self.signal)

        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, handler)
        return self


def log_pictures(exp_logger, model, features, data, shown_queries, shown_photos, *, image_size, device, step):
    """TensorBoard images: top-5 retrievals of fixed unseen sketches, and VxL masks of fixed photos."""
    net = strip_wrappers(model)
    grid = retrieval_summary(net, shown_queries, features["gallery"], data["gallery"].items,
                             image_size=image_size, device=device, topk=5)
    exp_logger.image("test/retrieval", grid, step)
    if net.sampler is not None:
        exp_logger.image("train/vxl_masks", mask_summary(net.sampler, shown_photos, image_size=image_size), step)


def user_errors() -> tuple:
    """What train.py reports as a message and exit status 2 (with UserError), not as a traceback."""
    from datasets.filelist import DatasetError  # bad data
    from models.encoder import WeightLoadError
    from datasets.mask_cache import MaskCacheError

    return (ExperimentError, CheckpointError, engine.NonFiniteLossError, DatasetError, MaskCacheError,
            WeightLoadError)


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    setup_logging(rank=int(os.environ.get("RANK", "0")))
    return run_cli(run, args, user_errors=user_errors, report=log)


def run(args) -> dict:
    args = resolve_args(args)
    output_dir = Path(args.output_dir) / args.exp
    device = select_device(args)
    rank, world, _ = dist_utils.init_distributed(device.type)
    if args.batch_size % world:  # before anything is built or written
        dist_utils.cleanup()
        raise UserError(f"--batch_size {args.batch_size} (the global batch) is not divisible by the {world} "
                        f"processes of torchrun: use a multiple of {world}.")
    is_main = rank == 0
    if is_main:
        prepare_output_dir(output_dir, resume=args.resume, overwrite=args.overwrite)
    dist_utils.barrier()
    setup_logging(output_dir if is_main else None, rank=rank)
    lock = RunLock(output_dir).acquire() if is_main else None
    if lock is not None:  # the folder is ours: drop half-written checkpoints of a killed earlier run
        for stale in output_dir.glob(".*.pth.*.tmp"):
            log.warning("removing %s, left by a run killed while saving a checkpoint", stale)
            stale.unlink(missing_ok=True)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _train(args, output_dir, device, rank, world, is_main)
    finally:
        for s, h in handlers.items():  # StopFlag's handlers end with the run (in-process callers)
            if signal.getsignal(s) is not h:
                signal.signal(s, h)
        if lock is not None:
            lock.release()
        dist_utils.cleanup()


def _train(args, output_dir: Path, device, rank: int, world: int, is_main: bool) -> dict:
    """One run: build, restore (--resume), then train and evaluate epoch by epoch with a checkpoint after each."""
    amp_dtype = select_amp(args, device)
    announce(args, device, is_main)
    torch.manual_seed(args.seed + rank)  # before anything is built: --seed decides the weights and dropout
    data, state, criterion = build(args, device, output_dir, amp_dtype=amp_dtype, rank=rank, world=world)
    if args.resume:
        resume(state, args, output_dir / "checkpoint.pth")
    if is_main:
        write_args_json(output_dir, vars(args))
    state.model, ddp_model = prepare_model(state.model, args, device, world)
    loaders = build_loaders(data, args, rank=rank, world=world, device=device)
    if is_main:
        log_schedule(args, len(data["train"]), world)
    exp_logger = ExperimentLogger(output_dir, enabled=is_main, purge_step=state.global_step if args.resume else None)
    state.health.exp_logger = exp_logger
    ctx = RunContext(args=args, output_dir=output_dir, device=device, amp_dtype=amp_dtype, world=world,
                     is_main=is_main, state=state, data=data, criterion=criterion, ddp_model=ddp_model,
                     loaders=loaders, exp_logger=exp_logger, stop=StopFlag().install())
    metrics: dict = {}
    for epoch in range(state.next_epoch, args.epoch):
        stats = train_epoch(ctx, epoch)  # an interrupted epoch saves a checkpoint and ends the run
        line = epoch_line(ctx, epoch, stats)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epoch:
            metrics = evaluate_epoch(ctx, epoch, stats, line)
        else:
            log.info("epoch %d: loss %.4f", epoch, stats["loss"])
        save(ctx)
        exp_logger.epoch_line(line)
        exp_logger.flush()
        stop_if_signalled(ctx, epoch)
    exp_logger.close()
    if is_main and metrics:
        log_final(metrics, state.best)
    return {"final": metrics, "best": state.best, "global_step": state.global_step, "output_dir": str(output_dir)}


def announce(args, device, is_main: bool) -> None:
    """What the run's settings imply, said before it starts."""
    if args.eval_per_class is not None and is_main:
        log.warning("--eval_per_class %d: evaluating on at most %d sketches and photos per unseen class, not the "
                    "full split: the mAP is not comparable with the paper's, and best.pth is chosen on this subset "
                    "(test.py evaluates the full split).", args.eval_per_class, args.eval_per_class)
    if device.type == "cuda":  # fixed image sizes: let cuDNN time and keep the fastest stem convolutions
        torch.backends.cudnn.benchmark = True


def build(args, device, output_dir: Path, *, amp_dtype, rank: int,
          world: int) -> tuple[dict, TrainState, torch.nn.Module]:
    """The data, the criterion, and a fresh :class:`TrainState`: the model, its optimizer (and fp16 scaler),
    the bad-file log and the health monitor (whose TensorBoard logger is set once it exists)."""
    from datasets import build_datasets
    from losses import build_criterion
    from models import build_model, model_summary

    if args.synthetic:
        log.info("no --data_path: training the '%s' preset on the built-in synthetic benchmark.", args.arch)
    mask_cache = None
    if args.vxl_cache:
        from models.vxl_cache import load_mask_cache_for_training

        mask_cache = load_mask_cache_for_training(args.vxl_cache, args)  # checks settings, builds no CLIP
        log.info("VxL masks from %s (%d photos): CLIP is not run during training.", args.vxl_cache, len(mask_cache))
    data = build_datasets(args, mask_cache=mask_cache)
    log.info("data: %s", json.dumps(data["split"].summary()))
    args.num_seen_classes = len(data["train"].label_names)  # the class head's size; kept in args.json and checkpoints
    model = build_model(args, with_sampler=mask_cache is None).to(device)
    log.info("model: %s", json.dumps(model_summary(model)))
    criterion = build_criterion(args).to(device)
    optimizer = torch.optim.Adam(list(model.trainable_parameters()), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    bad_files = BadFileLog(output_dir / "bad_files.txt" if rank == 0 else None, max_fraction=args.max_bad_fraction)
    health = HealthMonitor(distance=criterion.triplet.pair_distance, margin=criterion.triplet.margin,
                           on_collapse=args.on_collapse, log_every=args.log_every, patience=args.collapse_patience)
    state = TrainState(args, model=model, optimizer=optimizer, scaler=scaler, bad_files=bad_files, health=health,
                       rank=rank, world=world)
    return data, state, criterion


def resume(state: TrainState, args, path: Path) -> None:
    """--resume: continue ``state`` from the checkpoint at ``path``, refused when the run-defining flags differ."""
    state.restore(path, check_args=lambda saved: check_resume_args(args, saved, path))
    best = state.best["mAP@all"]
    log.info("resumed from epoch %d (after %d batches), step %d, best mAP@all %s", state.next_epoch,
             state.skip_batches, state.global_step, f"{best:.4f}" if best >= 0 else "none yet (not evaluated)")
    if state.next_epoch >= args.epoch:
        log.warning("the run has already trained its %d epochs: nothing to do. Pass a larger --epoch to "
                    "train longer.", state.next_epoch)


def prepare_model(model, args, device, world: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """torch.compile (--compile), SyncBatchNorm and DDP (several processes): ``(model, what trains and evaluates)``."""
    if args.compile:
        from models import compile_model

        compile_model(model, backend=args.compile_backend, mode=args.compile_mode)
        log.info("torch.compile (%s) on the encoder and the interaction head: the first steps trace and "
                 "compile, later steps run the compiled code.", args.compile_backend)
    if world > 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if device.type == "cuda":  # the tiny preset's stem BatchNorm: statistics over the global batch
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # SyncBatchNorm needs GPUs
            log.warning("--stem_norm batch with %d CPU processes: BatchNorm statistics are per process "
                        "(over %d samples), so results differ slightly from one process.",
                        world, args.batch_size // world)
    if world > 1:
        return model, torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, model


def log_schedule(args, triplets: int, world: int) -> None:
    updates = planned_updates(triplets, args.batch_size, args.epoch, world)
    log.info("schedule: %d epochs x %d steps (batch %d, %d triplets per epoch) = %d optimizer updates; Adam lr %g%s",
             args.epoch, updates // args.epoch, args.batch_size, triplets, updates, args.lr,
             f" after a linear warm-up over the first {args.warmup_steps} steps" if args.warmup_steps else ", constant")
    warning = schedule_warning(args, updates)
    if warning:
        log.warning("%s", warning)


@dataclass
class RunContext:
    """What the epoch loop works with: the run's :class:`TrainState` and what was built around it."""

    args: argparse.Namespace
    output_dir: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    world: int
    is_main: bool
    state: TrainState
    data: dict
    criterion: torch.nn.Module
    ddp_model: torch.nn.Module  # state.model, compiled and/or wrapped in DDP: what trains and evaluates
    loaders: dict
    exp_logger: ExperimentLogger
    stop: StopFlag
    class_names: list = field(init=False)
    shown_queries: list = field(init=False)  # a few fixed unseen queries and training photos, pictured in
    shown_photos: list = field(init=False)   # TensorBoard at every evaluation

    def __post_init__(self):
        self.class_names = sorted(self.data["class_to_idx"], key=self.data["class_to_idx"].get)
        self.shown_queries = select_items(self.data["query"].items, 4, seed=self.args.seed)
        self.shown_photos = select_items([(p, c) for c, ps in self.data["split"].train_photos.items() for p in ps],
                                         4, seed=self.args.seed)

    @property
    def progress(self) -> bool:
        return self.is_main and not self.args.no_progress


def save(ctx: RunContext, name: str = "checkpoint.pth", *, all_ranks: bool = True) -> None:
    """Rank 0 writes the run's state to ``name``; with ``all_ranks`` (every rank calls it) each rank's random
    state is kept."""
    if ctx.state.save(ctx.output_dir / name, all_ranks=all_ranks) is not None:
        discard_overwritten(ctx.output_dir)  # --overwrite's previous run, kept until now


def train_epoch(ctx: RunContext, epoch: int) -> dict:
    """Train ``epoch`` (from where an interrupted run stopped); an interruption saves and ends the run."""
    state, args = ctx.state, ctx.args
    ctx.loaders["sampler"].set_epoch(epoch, skip=state.skip_batches * (args.batch_size // ctx.world))
    stats = engine.train_one_epoch(
        ctx.ddp_model, ctx.criterion, ctx.loaders["train"], state.optimizer, device=ctx.device, epoch=epoch,
        global_step=state.global_step, amp_dtype=ctx.amp_dtype, scaler=state.scaler, exp_logger=ctx.exp_logger,
        log_every=args.log_every, should_stop=ctx.stop, bad_file_log=state.bad_files, progress=ctx.progress,
        carry=state.partial_epoch, health=state.health, lr_at=engine.linear_warmup(args.lr, args.warmup_steps),
    )
    state.global_step, state.partial_epoch = stats["global_step"], stats.pop("partial")
    if stats["interrupted"]:  # a signal, or a collapse with --on_collapse stop
        state.skip_batches += stats["steps"]
        stop_interrupted(ctx, epoch, collapsed=stats["collapsed"])
    state.next_epoch, state.skip_batches, state.partial_epoch = epoch + 1, 0, None
    return stats


def stop_interrupted(ctx: RunContext, epoch: int, *, collapsed: bool) -> None:
    """Save the interrupted epoch's checkpoint and exit: 2 after a collapse, 130/143 after SIGINT/SIGTERM."""
    save(ctx)
    ctx.exp_logger.close()
    checkpoint = ctx.output_dir / "checkpoint.pth"
    if collapsed:
        log.error("stopped at step %d because the embeddings collapsed (--on_collapse stop); checkpoint "
                  "saved to %s. Change the settings and start a new --exp (see the warning above).",
                  ctx.state.global_step, checkpoint)
        raise SystemExit(2)
    log.warning("stopped by %s during epoch %d at step %d; checkpoint saved to %s. "
                "Continue with --resume.", ctx.stop.signal, epoch, ctx.state.global_step, checkpoint)
    raise SystemExit(ctx.stop.exit_code)


def epoch_line(ctx: RunContext, epoch: int, stats: dict) -> dict:
    """log.txt's line of a trained epoch (without its evaluation); its training figures go to TensorBoard."""
    stats["steps"] = stats.pop("epoch_steps")  # the whole epoch's, across an interruption
    line = {"epoch": epoch, "step": ctx.state.global_step,
            **{f"train_{k}": v for k, v in stats.items() if k not in ("interrupted", "collapsed", "global_step")},
            "bad_files_skipped": ctx.state.bad_files.failed}
    ctx.exp_logger.scalars({k: v for k, v in stats.items() if k.startswith("loss")}, epoch, prefix="train/")
    ctx.exp_logger.scalars({"lr": stats["lr"], "epoch_time": stats["epoch_time"],
                            "samples_per_s": stats["samples_per_s"]}, epoch, prefix="speed/")
    return line


def evaluate_epoch(ctx: RunContext, epoch: int, stats: dict, line: dict) -> dict:
    """Evaluate after ``epoch``: metrics into ``line`` and TensorBoard, best.pth when mAP@all improves."""
    state = ctx.state
    try:
        metrics = engine.evaluate(ctx.ddp_model, ctx.loaders["query"], ctx.loaders["gallery"], device=ctx.device,
                                  amp_dtype=ctx.amp_dtype, class_names=ctx.class_names, progress=ctx.progress,
                                  return_features=ctx.is_main and not ctx.args.no_tb_images)
    except Exception:  # keep the epoch just trained: --resume goes on, test.py can evaluate it
        save(ctx, all_ranks=False)  # other ranks may not get here: no collective
        log.error("the evaluation after epoch %d failed; the trained epoch is saved in %s", epoch,
                  ctx.output_dir / "checkpoint.pth")
        raise
    features = metrics.pop("_features", None)
    metrics.pop("_unreadable", None)  # counted in the metrics; listed by test.py
    if features is not None:
        log_pictures(ctx.exp_logger, state.model, features, ctx.data, ctx.shown_queries, ctx.shown_photos,
                     image_size=ctx.args.image_size, device=ctx.device, step=epoch)
    scalar_metrics = {k: v for k, v in metrics.items() if isinstance(v, float)}
    ctx.exp_logger.scalars(scalar_metrics, epoch, prefix="test/")
    line.update({f"test_{k}": v for k, v in scalar_metrics.items()})
    log.info("epoch %d: loss %.4f | unseen mAP@all %.4f  P@100 %.4f  mAP@200 %.4f  P@200 %.4f "
             "(chance %.4f)", epoch, stats["loss"], metrics["mAP@all"], metrics["P@100"],
             metrics["mAP@200"], metrics["P@200"], metrics["chance_mAP"])
    if metrics["mAP@all"] > state.best["mAP@all"]:
        state.best = {"mAP@all": metrics["mAP@all"], "epoch": epoch,
                      **{k: metrics[k] for k in ("mAP@200", "P@100", "P@200")}}
        save(ctx, "best.pth")
    return metrics


def stop_if_signalled(ctx: RunContext, epoch: int) -> None:
    """After a saved epoch: exit (130/143) when any rank got SIGINT/SIGTERM during it."""
    if dist_utils.any_rank(ctx.stop(), ctx.device):
        log.warning("stopped by %s after epoch %d; continue with --resume.", ctx.stop.signal or "a signal to "
                    "another rank", epoch)
        ctx.exp_logger.close()
        raise SystemExit(ctx.stop.exit_code)


def log_final(metrics: dict, best: dict) -> None:
    from utils.metrics import chance_ratios

    ratios, verdict = chance_ratios(metrics)
    log.info("final unseen-class mAP@all %.4f (%.1fx chance), P@100 %.4f (%.1fx chance); chance level %.4f: "
             "%s 2x chance. Best mAP@all %.4f at epoch %d.", metrics["mAP@all"], ratios["mAP@all"],
             metrics["P@100"], ratios["P@100"], metrics["chance_mAP"], verdict, best["mAP@all"], best["epoch"])


if __name__ == "__main__":
    main()
