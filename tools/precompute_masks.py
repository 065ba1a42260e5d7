"""Compute the VxL keep-mask of every training photo once, so that training can skip CLIP.

    python -m tools.precompute_masks --data_path ROOT --dataset sketchy_extend \\
        --test_class test_class_sketchy25 --clip_weights ViT-B-16.pt --out masks/sketchy25.npz
    python train.py ... --vxl_cache masks/sketchy25.npz          # same settings, no CLIP

    python -m tools.precompute_masks --out masks/synthetic.npz   # the synthetic benchmark, tiny preset

The masks come from the very sampler training would build (``models.build_vxl_sampler`` with
train.py's flags: --arch, --clip_weights, --keep_ratio, --prompt, --vxl_norm, --clip_input_norm) on
the very photos it would see (``datasets.transforms.preprocess_photo`` at --image_size), in fp32.
The photo's class text is its class in the split (its folder name), as in training.

Resumable: the cache at --out is saved every --save_every batches; running the same command again
loads it (refusing one made with other settings) and computes only the missing photos.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset
from utils.progress import progress_bar

from tools import ToolError, run_tool, select_device
from utils.config import DEVICES, SAMPLER_SETTINGS, RunConfig, RuntimeConfig, add_config_flags, make_config

log = logging.getLogger("precompute_masks")


# train.py's settings that decide the masks: the same flags, read into the same configuration.
MASK_SETTINGS = {"data_path", "dataset", "test_class", "custom_split", "synthetic_dir", "image_size", "arch",
                 "clip_weights", *SAMPLER_SETTINGS}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Precompute VxL keep-masks of the training photos", add_help=True)
    add_config_flags(p, names=MASK_SETTINGS)  # train.py's flags and defaults (its data and model groups)
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="the cache file (.npz) to write or complete")
    g.add_argument("--batch_size", type=int, default=64, help="photos per sampler call")
    g.add_argument("--num_workers", type=int, default=2, help="data-loading processes")
    g.add_argument("--device", default=RuntimeConfig.device, choices=DEVICES)
    g.add_argument("--save_every", type=int, default=200, help="save the partial cache every N batches")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    return p


class _PhotoSet(Dataset):
    """(absolute path, relative path, class) -> preprocessed photo, as the training dataset makes it."""

    def __init__(self, items, image_size: int):
        self.items, self.image_size = items, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from datasets.transforms import load_image, preprocess_photo

        path, rel, cname = self.items[i]
        return preprocess_photo(load_image(path), self.image_size), rel, cname  # [3, S, S]


def _resolve(args) -> RunConfig:
    """The configuration train.py would run with for the same flags (the masks' settings among them)."""
    for name in ("batch_size", "save_every"):
        if getattr(args, name) < 1:
            raise ToolError(f"--{name} must be positive (got {getattr(args, name)})")
    if args.num_workers < 0:
        raise ToolError(f"--num_workers must be >= 0 (got {args.num_workers})")
    return make_config(given={k: v for k, v in vars(args).items() if k in MASK_SETTINGS})


def _command(argv) -> str:
    """This run's flags, quoted: the command that completes the cache (saved in its meta)."""
    return " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def _open_cache(out: str, key: dict, num_patches: int):
    """The cache at ``out`` to complete (it must have been made with ``key``), or a new one."""
    from datasets.mask_cache import MaskCache, MaskCacheError

    if not os.path.exists(out):
        return MaskCache(key=key, num_patches=num_patches)
    try:
        cache = MaskCache.load(out, expected_key=key)
    except MaskCacheError as e:
        raise ToolError(f"{e}\n(--out {out} holds another cache: choose another --out or delete it)") from None
    log.info("resuming %s: %d photos already cached", out, len(cache))
    return cache


def _build_sampler(config: RunConfig, key: dict, device: torch.device):
    """The VxL sampler of ``config`` (models.build_model's builder), checked against ``key``."""
    from models.vxl_cache import mask_cache_key
    from models.vxl_sampler import sampler_for

    sampler = sampler_for(config.model).to(device)
    built_key = mask_cache_key(sampler, image_size=config.data.image_size, clip=key["clip"])
    if built_key != key:  # expected_cache_key has drifted from build_vxl_sampler: a bug, say where
        raise RuntimeError(f"models.vxl_cache.expected_cache_key disagrees with the sampler built by "
                           f"build_vxl_sampler: {built_key} vs {key}")
    return sampler


def _compute(sampler, cache, todo: list, args, image_size: int, device: torch.device, summary: dict) -> None:
    """Masks of the ``todo`` photos into ``cache``, saved every ``--save_every`` batches and on a bad photo."""
    from datasets.filelist import DatasetError
    from utils.errors import user_message

    loader = DataLoader(_PhotoSet(todo, image_size), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    bar = progress_bar(loader, desc="VxL masks", unit="batch", enabled=not args.no_progress)
    try:
        for step, (images, rels, cnames) in enumerate(bar, 1):
            masks = sampler(images.to(device, non_blocking=True), list(cnames))  # [b, N], fp32, no grad
            cache.add(list(rels), masks)
            summary["computed"] += len(rels)
            if step % args.save_every == 0:
                cache.save(args.out)
    except DatasetError as e:  # an unreadable photo: keep what is done, say how to go on
        if summary["computed"]:
            cache.save(args.out)
        raise ToolError(f"{user_message(e)}\n{summary['computed']} masks computed in this run are saved in "
                        f"{args.out}; replace or remove that photo (python -m datasets.prepare --check ROOT "
                        f"--verify_images lists every unreadable file), then rerun the same command to continue.") \
            from None
    finally:
        bar.close()


def run(args, argv=None) -> dict:
    from datasets import load_split
    from models.vxl_cache import expected_cache_key

    config = _resolve(args)
    try:
        key = expected_cache_key(config)
    except (FileNotFoundError, ValueError) as e:
        raise ToolError(str(e)) from None
    split = load_split(config.data, progress=not args.no_progress)
    grid = key["grid_size"]
    num_patches = grid[0] * grid[1]
    # Every training photo with the class text training gives CLIP (its class in the split).
    items = [(str(path), str(path.relative_to(split.root).as_posix()), cname)
             for cname, files in sorted(split.train_photos.items()) for path in files]
    cache = _open_cache(args.out, key, num_patches)
    cache.meta.update(command=_command(argv), dataset=split.name, train_photos=len(items),
                      torch=torch.__version__, precision="fp32")
    todo = [it for it in items if it[1] not in cache]
    summary = {"out": args.out, "train_photos": len(items), "already_cached": len(items) - len(todo),
               "computed": 0, "num_patches": num_patches}
    if not todo:
        cache.meta["complete"] = True
        cache.save(args.out)
        print(f"{args.out}: all {len(items)} training photos already cached; nothing to do.")
        return summary

    import open_clip

    device = select_device(args.device)
    sampler = _build_sampler(config, key, device)
    cache.meta.update(device=str(device), complete=False, open_clip=open_clip.__version__)
    start = time.perf_counter()
    _compute(sampler, cache, todo, args, config.data.image_size, device, summary)
    cache.meta["complete"] = True
    cache.save(args.out)
    elapsed = time.perf_counter() - start
    kept = num_patches - sampler.num_masked
    print(f"{args.out}: {summary['computed']} masks computed in {elapsed:.1f} s "
          f"({summary['computed'] / max(elapsed, 1e-9):.1f} photos/s), {len(cache)} of {len(items)} training photos "
          f"cached; each keeps {kept} of {num_patches} patches. Train with --vxl_cache {args.out}")
    return summary


def main(argv=None) -> dict:
    """Bad input (a missing dataset or CLIP file, a foreign cache, an unreadable photo) is a message on
    stderr and exit status 2, as for every tool (``tools.run_tool``)."""
    return run_tool("precompute_masks", lambda a: run(a, argv), get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
