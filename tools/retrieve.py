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
cosine similarity (ties keep the gallery order; ``--index`` exact, FAISS, or auto by gallery size:
``tools.search``, which ``tools.demo`` shares), the top K are printed, and a picture is written:
the sketch, then the top K, framed green / red when the classes are known to match / differ.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from tools import ToolError, run_tool
from tools.search import (UNKNOWN_CLASS, SketchSearch, add_search_args, checkpoint_settings, open_checkpoint,
                          open_gallery)

log = logging.getLogger("retrieve")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m tools.retrieve", description="PuXIM single-sketch retrieval")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (best.pth)")
    p.add_argument("--sketch", required=True, help="the query sketch (any image file)")
    p.add_argument("--sketch_class", default=None,
                   help="the sketch's class, to frame results green/red (default: the sketch's folder "
                        "name when the gallery has such a class)")
    p.add_argument("--topk", type=int, default=10, help="how many results to print and draw (default 10)")
    p.add_argument("--out", default=None, help="picture to write (default: retrieval_<sketch name>.png)")
    p.add_argument("--tile_size", type=int, default=160, help="side of one image in the picture (default 160)")
    add_search_args(p)
    return p


def main(argv=None) -> list[tuple[str, float]]:
    """Run the tool; returns the top K as ``(path, cosine score)``, best first."""
    return run_tool("tools.retrieve", run, get_args_parser().parse_args(argv))


# ----------------------------------------------------------------------------- the tool
def run(args) -> list[tuple[str, float]]:
    from datasets.transforms import load_image
    from utils.visualize import retrieval_grid, save_png

    if args.batch_size < 1:
        raise ToolError(f"--batch_size must be positive, got {args.batch_size}")
    ckpt = open_checkpoint(args.checkpoint)
    gallery = open_gallery(args, checkpoint_settings(ckpt, args.checkpoint))
    items = gallery.items
    if not 1 <= args.topk <= len(items):
        raise ToolError(f"--topk {args.topk} must be between 1 and the gallery size, {len(items)} images.")

    sketch_img = _load_query_sketch(args.sketch)
    if args.out is not None and Path(args.out).is_dir():
        raise ToolError(f"--out {args.out} is a folder: give the file to write, e.g. "
                        f"{Path(args.out) / 'retrieval.png'}")
    query_class = _query_class(args, items)

    hits = SketchSearch.open(args, ckpt, gallery).search(sketch_img, args.topk)
    results = [(h.path, h.score) for h in hits]

    # Correctness is known when both the query's and the result's classes are.
    correct = [None if (query_class is None or h.cls is None) else h.cls == query_class for h in hits]
    _print_top(args, len(items), hits, correct, query_class)

    out = Path(args.out) if args.out else Path(f"retrieval_{Path(args.sketch).stem}.png")
    picture = retrieval_grid(np.asarray(sketch_img), [np.asarray(load_image(h.path)) for h in hits],
                             correct=correct, scores=[h.score for h in hits], titles=[h.cls or "?" for h in hits],
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


def _print_top(args, num_items: int, hits, correct, query_class) -> None:
    """Print the top-K table (rank, score, match, class, path) to stdout; returns nothing."""
    print(f"top {args.topk} of {num_items} gallery images for {args.sketch}"
          + (f" (class {query_class})" if query_class else "") + ":")
    print(f"{'rank':>4}  {'score':>7}  {'match':5}  {'class':16}  path")
    for r, (h, ok) in enumerate(zip(hits, correct), 1):
        mark = "?" if ok is None else ("yes" if ok else "no")
        print(f"{r:>4}  {h.score:7.4f}  {mark:5}  {h.cls or '-':16}  {h.path}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
