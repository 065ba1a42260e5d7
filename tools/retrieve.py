"""Retrieve photos for one sketch with a trained PuXIM checkpoint.

    python -m tools.retrieve --checkpoint results/EXP/best.pth --sketch my_sketch.png --topk 10
    python -m tools.retrieve --checkpoint best.pth --sketch cat.png --gallery ~/photos --out cat.png

The gallery is either a folder of JPEG/PNG files (searched recursively; an image inside a
subfolder has that subfolder's name as its class) or, by default, the unseen-class photos of the
checkpoint's own benchmark split (``--data_path`` / ``--dataset`` / ``--test_class`` choose another).
The model is rebuilt from the checkpoint's saved training arguments. The gallery is embedded once
and its embeddings are cached on disk (``--cache_dir``, default ``$PUXIM_CACHE/retrieval`` or
``~/.cache/puxim/retrieval``); the cache is reused while the checkpoint file and every gallery
file (path, size, modification time) are unchanged. The sketch is ranked against the gallery by
cosine similarity (ties keep the gallery order), the top K are printed, and a picture is written:
the sketch, then the top K, framed green / red when the classes are known to match / differ.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tools import ToolError, run_tool, select_device
from utils.io import atomic_write

log = logging.getLogger("retrieve")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CACHE_FORMAT = 1
UNKNOWN_CLASS = ""  # gallery images directly in the gallery folder have no class


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m tools.retrieve", description="PuXIM single-sketch retrieval")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (best.pth)")
    p.add_argument("--sketch", required=True, help="the query sketch (any image file)")
    p.add_argument("--sketch_class", default=None,
                   help="the sketch's class, to frame results green/red (default: the sketch's folder "
                        "name when the gallery has such a class)")
    g = p.add_argument_group("gallery (default: the unseen photos of the checkpoint's own split)")
    g.add_argument("--gallery", default=None,
                   help="a folder of images (recursive); images in subfolders take the subfolder's name as class")
    g.add_argument("--data_path", default=None, help="benchmark root, as train.py (default: the checkpoint's)")
    g.add_argument("--dataset", default=None, help="as train.py (default: the checkpoint's)")
    g.add_argument("--test_class", default=None, help="as train.py (default: the checkpoint's)")
    g.add_argument("--custom_split", action="store_true", default=None,
                   help="as train.py (default: the checkpoint's)")
    g.add_argument("--synthetic_dir", default=None,
                   help="cache folder of the synthetic benchmark (default: the checkpoint's)")
    p.add_argument("--topk", type=int, default=10, help="how many results to print and draw (default 10)")
    p.add_argument("--out", default=None, help="picture to write (default: retrieval_<sketch name>.png)")
    p.add_argument("--tile_size", type=int, default=160, help="side of one image in the picture (default 160)")
    p.add_argument("--cache_dir", default=None,
                   help="gallery embedding cache (default: $PUXIM_CACHE/retrieval or ~/.cache/puxim/retrieval)")
    p.add_argument("--no_cache", action="store_true", help="embed the gallery again and write no cache")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: CUDA if available")
    p.add_argument("--batch_size", type=int, default=32, help="gallery images per forward pass (default 32)")
    p.add_argument("--num_workers", type=int, default=0, help="data loader processes for the gallery (default 0)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> list[tuple[str, float]]:
    """Run the tool; returns the top K as ``(path, cosine score)``, best first."""
    return run_tool("tools.retrieve", run, get_args_parser().parse_args(argv))


# ----------------------------------------------------------------------------- gallery
def scan_gallery(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """Every image file under ``folder`` (recursive, sorted, hidden entries skipped) as ``(path, class)``.

    The class is the name of the image's folder; images directly in ``folder`` get ``UNKNOWN_CLASS``.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ToolError(f"--gallery {folder}: not a folder (give a folder of JPEG/PNG images).")
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            items.append((str((here / name).resolve()), UNKNOWN_CLASS if here == root else here.name))
    if not items:
        raise ToolError(f"--gallery {folder}: no images found (looked recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}).")
    return items


def split_gallery(args, saved: dict) -> tuple[list[tuple[str, str]], str]:
    """The unseen photos of a benchmark split: ``--data_path``... or the checkpoint's own data args."""
    from datasets import load_split

    data_path = args.data_path if args.data_path is not None else saved.get("data_path")
    if data_path is not None and args.data_path is None and not Path(data_path).expanduser().is_dir():
        raise ToolError(f"the checkpoint was trained on --data_path {data_path}, which is not there (any more): "
                        f"pass --data_path ROOT where the dataset is now, or --gallery FOLDER to search a folder "
                        f"of photos.")
    # This command's data flags, each falling back to the checkpoint's.
    split = load_split(SimpleNamespace(
        data_path=data_path, synthetic_dir=args.synthetic_dir or saved.get("synthetic_dir"),
        dataset=args.dataset or saved.get("dataset"), test_class=args.test_class or saved.get("test_class"),
        custom_split=args.custom_split if args.custom_split is not None else saved.get("custom_split"),
        no_progress=args.no_progress))
    items = [(str(Path(p).resolve()), c) for p, c in split.test_photos]
    return items, f"{split.name}@{split.root.resolve()}"


# ----------------------------------------------------------------------------- embedding cache
def default_cache_dir() -> Path:
    from datasets.synthetic import default_cache_dir as puxim_cache

    return puxim_cache() / "retrieval"


def _stat(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def cache_key(checkpoint: str, image_size: int, items: list[tuple[str, str]]) -> str:
    """Hash of what the embeddings depend on: the checkpoint file, the input size, every gallery file."""
    try:
        content = {"format": CACHE_FORMAT, "checkpoint": _stat(str(Path(checkpoint).resolve())),
                   "image_size": image_size, "gallery": [_stat(p) for p, _ in items]}
    except FileNotFoundError as e:
        raise ToolError(f"{e.filename}: file not found (listed in the gallery).") from None
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def cache_file(cache_dir: Path, checkpoint: str, gallery_id: str, image_size: int) -> Path:
    """One cache file per (checkpoint path, gallery, input size): a changed gallery replaces it."""
    slot = json.dumps([str(Path(checkpoint).resolve()), gallery_id, image_size])
    return cache_dir / f"gallery-{hashlib.sha1(slot.encode()).hexdigest()[:16]}.npz"


def read_cache(path: Path, key: str, num: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key or data["feats"].shape[0] != num:
                return None
            return data["feats"].astype(np.float32)
    except Exception as e:  # an unreadable cache is only a cache: embed again
        log.warning("ignoring unreadable embedding cache %s (%s)", path, e)
        return None


def write_cache(path: Path, key: str, feats: np.ndarray, items: list[tuple[str, str]]) -> None:
    """Write atomically (temporary file, then rename): a reader never sees half a cache."""
    with atomic_write(path, "wb") as f:
        np.savez(f, key=np.array(key), feats=feats.astype(np.float32), paths=np.array([p for p, _ in items]))


# ----------------------------------------------------------------------------- model
def build_from_checkpoint(ckpt: dict, ckpt_path: str, device: torch.device):
    """The PuXIM model of a checkpoint (its saved args), weights loaded, no sampler, nothing downloaded."""
    from models import build_model
    from utils.checkpoint import load_model_weights

    saved = argparse.Namespace(**ckpt["args"])
    saved.vit_weights = None  # the checkpoint holds the trained weights: no pretrained initialisation
    try:
        model = build_model(saved, with_sampler=False)
    except ValueError as e:
        raise ToolError(f"{ckpt_path}: cannot rebuild the model from its saved arguments: {e}") from None
    load_model_weights(model, ckpt["model"], source=ckpt_path)
    return model.to(device).eval()


def embed_gallery(model, items, *, image_size: int, device, batch_size: int, num_workers: int,
                  progress: bool) -> np.ndarray:
    """Photo embeddings ``[G, D]`` of the gallery, through the same loop as evaluation."""
    from torch.utils.data import DataLoader

    import engine
    from datasets import ImageListDataset

    classes = sorted({c for _, c in items})
    dataset = ImageListDataset(items=items, class_to_idx={c: i for i, c in enumerate(classes)},
                               kind="photo", image_size=image_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats, _, _ = engine.extract_features(model, loader, device=device, modality="photo", progress=progress)
    return feats.cpu().numpy()  # [G, D]


# ----------------------------------------------------------------------------- the tool
def run(args) -> list[tuple[str, float]]:
    from datasets.transforms import load_image, preprocess_sketch
    from utils.checkpoint import load_checkpoint
    from utils.visualize import cosine_ranking, retrieval_grid, save_png

    if args.batch_size < 1:
        raise ToolError(f"--batch_size must be positive, got {args.batch_size}")
    ckpt = load_checkpoint(args.checkpoint)
    if not isinstance(ckpt.get("args"), dict):
        raise ToolError(f"{args.checkpoint} carries no training arguments; it was not written by train.py.")
    saved = ckpt["args"]

    if args.gallery is not None:
        items = scan_gallery(args.gallery)
        gallery_id = str(Path(args.gallery).expanduser().resolve())
    else:
        items, gallery_id = split_gallery(args, saved)
    if not 1 <= args.topk <= len(items):
        raise ToolError(f"--topk {args.topk} must be between 1 and the gallery size, {len(items)} images.")

    sketch_img = _load_query_sketch(args.sketch)
    if args.out is not None and Path(args.out).is_dir():
        raise ToolError(f"--out {args.out} is a folder: give the file to write, e.g. "
                        f"{Path(args.out) / 'retrieval.png'}")
    query_class = _query_class(args, items)

    device = select_device(args.device)
    model = build_from_checkpoint(ckpt, args.checkpoint, device)
    image_size = int(saved.get("image_size") or model.encoder.img_size)
    feats = _gallery_features(args, model, items, gallery_id, image_size, device)  # [G, D]

    with torch.no_grad():
        sketch = preprocess_sketch(sketch_img, image_size)[None].to(device)  # [1, 3, S, S]
        query = model.encode(sketch, "sketch").float().cpu()  # [1, D]
    order, sims = cosine_ranking(query, feats)
    top = order[0, :args.topk]
    results = [(items[g][0], float(sims[0, g])) for g in top]

    # Correctness is known when both the query's and the result's classes are.
    correct = [None if (query_class is None or items[g][1] == UNKNOWN_CLASS) else items[g][1] == query_class
               for g in top]
    _print_top(args, items, top, sims, correct, query_class)

    out = Path(args.out) if args.out else Path(f"retrieval_{Path(args.sketch).stem}.png")
    picture = retrieval_grid(np.asarray(sketch_img), [np.asarray(load_image(items[g][0])) for g in top],
                             correct=correct,
                             scores=[s for _, s in results], titles=[items[g][1] or "?" for g in top],
                             query_title=f"query: {query_class}" if query_class else "query", tile_size=args.tile_size)
    save_png(picture, out)
    log.info("wrote %s", out)
    return results


def _load_query_sketch(sketch_path: str):
    """The query sketch as a PIL image; a ``ToolError`` when it is not an image or is blank."""
    from datasets.transforms import INK_THRESHOLD, ImageLoadError, ink_bbox, load_image

    try:  # fails early, naming the file, when it is not an image
        sketch_img = load_image(sketch_path)
    except ImageLoadError as e:  # its advice is about dataset lists; this is a single query file
        raise ToolError(f"--sketch {str(e).split('; ')[0]}: give a PNG or JPEG drawing.") from None
    if ink_bbox(np.asarray(sketch_img)) is None:  # its ranking would say nothing about any drawing
        raise ToolError(f"{sketch_path}: the sketch is blank (no pixel darker than R+G+B = {INK_THRESHOLD}); "
                        f"draw dark strokes on a light background.")
    return sketch_img


def _query_class(args, items) -> str | None:
    """The sketch's class: ``--sketch_class``, else its folder's name when that is a gallery class, else ``None``.

    Warns when the class given is not a class of the gallery (every result then counts as wrong).
    """
    known = {c for _, c in items if c != UNKNOWN_CLASS}
    query_class = args.sketch_class
    if query_class is None and Path(args.sketch).resolve().parent.name in known:
        query_class = Path(args.sketch).resolve().parent.name
    if query_class is not None and query_class not in known:
        log.warning("the sketch's class %r is not a class of the gallery: every result counts as wrong",
                    query_class)
    return query_class


def _gallery_features(args, model, items, gallery_id: str, image_size: int, device) -> np.ndarray:
    """Photo embeddings ``[G, D]`` of the gallery: from the cache when it is valid, else embedded (and cached)."""
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    key = cache_key(args.checkpoint, image_size, items)
    path = cache_file(cache_dir, args.checkpoint, gallery_id, image_size)
    feats = None if args.no_cache else read_cache(path, key, len(items))
    if feats is not None:
        log.info("using cached gallery embeddings from %s (%d images)", path, len(items))
    else:
        log.info("embedding %d gallery images", len(items))
        feats = embed_gallery(model, items, image_size=image_size, device=device, batch_size=args.batch_size,
                              num_workers=args.num_workers, progress=not args.no_progress)
        if not args.no_cache:
            write_cache(path, key, feats, items)
            log.info("cached the gallery embeddings in %s", path)
    return feats


def _print_top(args, items, top, sims, correct, query_class) -> None:
    """Print the top-K table (rank, score, match, class, path) to stdout; returns nothing."""
    print(f"top {args.topk} of {len(items)} gallery images for {args.sketch}"
          + (f" (class {query_class})" if query_class else "") + ":")
    print(f"{'rank':>4}  {'score':>7}  {'match':5}  {'class':16}  path")
    for r, (g, ok) in enumerate(zip(top, correct), 1):
        mark = "?" if ok is None else ("yes" if ok else "no")
        print(f"{r:>4}  {sims[0, g]:7.4f}  {mark:5}  {items[g][1] or '-':16}  {items[g][0]}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
