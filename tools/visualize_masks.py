"""Draw what the VxL sampler keeps: per photo, the photo, its relevance map and the kept patches.

    python -m tools.visualize_masks --arch tiny --num 8                              # synthetic benchmark
    python -m tools.visualize_masks --clip_weights ViT-B-16.pt --photos a.jpg b.jpg --classes cat dog
    python -m tools.visualize_masks --checkpoint results/EXP/best.pth --split train --num 16
    python -m tools.visualize_masks --clip_weights ViT-B-16.pt --data_path ROOT --dataset sketchy_extend \\
        --test_class test_class_sketchy25 --split test --num 16 --seed 1

The sampler is built by ``models.vxl_sampler.build_vxl_sampler`` with train.py's options (or the
ones saved in ``--checkpoint``), and photos are preprocessed with ``preprocess_photo`` at the
sampler's input size, so the masks are the very ones training uses. One PNG per ``--batch`` photos
is written to ``--out``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from tools import ToolError, precompute_masks, run_tool, select_device
from utils.config import DEVICES, RunConfig, RuntimeConfig, add_config_flags, make_config

log = logging.getLogger("visualize_masks")

# train.py's settings that decide which photos and which masks (its flags, read into its configuration); the image
# size is not among them: the photos are shown at the sampler's input size.
MASK_SETTINGS = precompute_masks.MASK_SETTINGS - {"image_size"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m tools.visualize_masks", description="PuXIM VxL mask pictures")
    g = p.add_argument_group("photos: your own files, or a benchmark split (train.py's flags below; default: the "
                             "synthetic benchmark)")
    g.add_argument("--photos", nargs="+", default=None, help="image files")
    g.add_argument("--classes", nargs="+", default=None, help="one class name per --photos file")
    g.add_argument("--split", default="train", choices=["train", "test"],
                   help="seen-class training photos (default) or unseen-class test photos")
    g.add_argument("--num", type=int, default=8, help="how many photos to draw from the split (default 8)")
    g.add_argument("--seed", type=int, default=0, help="which photos, spread over the classes (default 0)")
    g.add_argument("--checkpoint", default=None, help="take the settings not given here from this training run")
    p.add_argument("--batch", type=int, default=8, help="photos per picture (default 8)")
    p.add_argument("--out", default="results/vxl_masks", help="folder for the PNG pictures (default results/vxl_masks)")
    p.add_argument("--device", default=RuntimeConfig.device, choices=DEVICES, help="default: CUDA if available")
    # --arch: b16 = OpenAI CLIP ViT-B/16 (needs --clip_weights); unless given, b16 with --clip_weights or
    # --data_path, else tiny (the random tiny CLIP)
    add_config_flags(p, names=MASK_SETTINGS)
    return p


def main(argv=None) -> list[Path]:
    """Run the tool; returns the written PNG paths."""
    return run_tool("tools.visualize_masks", run, get_args_parser().parse_args(argv))


def resolve_settings(args) -> RunConfig:
    """The configuration of the masks: the command line, else the checkpoint's, else train.py's preset."""
    saved = {}
    if args.checkpoint is not None:
        from utils.checkpoint import load_checkpoint

        from tools.search import checkpoint_settings

        saved = checkpoint_settings(load_checkpoint(args.checkpoint), args.checkpoint)
        if saved.get("variant") == "non-mask":
            log.warning("%s was trained without VxL masks (--variant non-mask); showing the masks anyway.",
                        args.checkpoint)
    settings = {**saved, **{k: v for k, v in vars(args).items() if k in MASK_SETTINGS}}
    # train.py's rule, except that --clip_weights alone also means b16: the tool draws masks on your own --photos
    # too, and such a file is then OpenAI's ViT-B/16.
    wants_b16 = settings.get("data_path") is not None or settings.get("clip_weights") is not None
    return make_config(settings.get("arch") or ("b16" if wants_b16 else "tiny"), given=settings, check=False)


def choose_photos(args, config: RunConfig) -> list[tuple[str, str]]:
    """``(path, class)`` of the photos to draw: ``--photos``/``--classes`` or ``--num`` from a split."""
    from datasets import load_split
    from utils.visualize import select_items

    if args.photos is not None or args.classes is not None:
        if args.photos is None or args.classes is None or len(args.photos) != len(args.classes):
            raise ToolError(f"--photos and --classes go together, one class name per photo (got "
                            f"{len(args.photos or [])} photos and {len(args.classes or [])} class names).")
        return list(zip(args.photos, args.classes))
    if args.num < 1:
        raise ToolError(f"--num must be positive, got {args.num}")
    split = load_split(config.data, check_files=False)
    if args.split == "train":
        items = [(str(p), c) for c, paths in split.train_photos.items() for p in paths]
    else:
        items = [(str(p), c) for p, c in split.test_photos]
    return select_items(items, args.num, seed=args.seed)


def build_sampler(config: RunConfig, device: torch.device):
    """The VxL sampler exactly as ``models.build_model`` builds it for training."""
    from models.vxl_sampler import sampler_for

    try:
        sampler = sampler_for(config.model)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise ToolError(str(e)) from None
    return sampler.to(device)


def run(args) -> list[Path]:
    from datasets.transforms import load_image, preprocess_photo
    from utils.visualize import denormalize, mask_figure, save_png

    if args.batch < 1:
        raise ToolError(f"--batch must be positive, got {args.batch}")
    device = select_device(args.device)
    config = resolve_settings(args)
    items = choose_photos(args, config)
    images = [load_image(p) for p, _ in items]  # fail early, naming a bad file
    sampler = build_sampler(config, device)
    size = sampler.image_size
    log.info("VxL sampler (%s, keep ratio %.2f, prompt %r, %s norm, %s input): %d photos at %dx%d",
             config.model.arch, sampler.keep_ratio, sampler.prompt, sampler.feature_norm, sampler.input_norm,
             len(items), size, size)

    out_dir = Path(args.out)
    written = []
    for b, start in enumerate(range(0, len(items), args.batch)):
        chunk = items[start:start + args.batch]
        photos = torch.stack([preprocess_photo(img, size) for img in images[start:start + args.batch]])
        names = [c for _, c in chunk]
        with torch.no_grad():
            relevance = sampler.relevance(photos.to(device), names)  # [b, N]
            keep = sampler.mask_from_relevance(relevance)  # [b, N], what sampler.forward returns
        figure = mask_figure(denormalize(photos), relevance, keep, names, grid=(len(chunk), 1))
        written.append(save_png(figure, out_dir / f"masks_{b:03d}.png"))
        log.info("wrote %s (%s)", written[-1], ", ".join(f"{Path(p).name}: {c}" for p, c in chunk))
    return written


if __name__ == "__main__":
    main()
