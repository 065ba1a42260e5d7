"""Pictures of what PuXIM does: VxL masks and retrieval results, as ``uint8 [H, W, 3]`` arrays.

Everything here draws on numpy and PIL (matplotlib only lends its colour maps, no figure and no
backend), and returns a plain ``uint8 [H, W, 3]`` array: :func:`save_png` writes it to a file and
TensorBoard takes it as it is (``writer.add_image(tag, image, step, dataformats="HWC")``).

* :func:`mask_figure` — per photo three panels, as in the PuXIM paper's figure: the photo, its
  VxL relevance map (colour map over the photo) and the patches the mask keeps (the others grey).
* :func:`retrieval_grid` — a sketch query, then its top K photos, framed green / red when the
  class is known to match / not to match, with class names and cosine scores as captions.
* :func:`retrieval_summary`, :func:`mask_summary` — the two TensorBoard images ``train.py`` adds
  at every evaluation: they run the model / the sampler on a few fixed images (at most 8).

The layout is fixed by the constants below, so a picture's size follows from its content (the
tests derive the expected sizes from them): see :func:`mask_figure_size`, :func:`mask_panel_origin`,
:func:`retrieval_grid_size` and :func:`retrieval_tile_origin`.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from utils.normalization import ENCODER_MEAN, ENCODER_STD

__all__ = [
    "denormalize", "mask_figure", "mask_figure_size", "mask_panel_origin",
    "retrieval_grid", "retrieval_grid_size", "retrieval_tile_origin", "stack_rows", "save_png",
    "cosine_ranking", "select_items", "retrieval_summary", "mask_summary",
    "MARGIN", "GAP", "TEXT_H", "MASK_FILL", "BORDER", "QUERY_GAP", "CAPTION_LINES", "TILE_SIZE",
    "GREEN", "RED", "BLUE", "NEUTRAL", "BACKGROUND",
]

# ----------------------------------------------------------------------------- layout constants
MARGIN = 6  # white space around a figure and between its cells (pixels)
GAP = 4  # white space between the panels of one cell, or between retrieval tiles
TEXT_H = 14  # height of one line of caption text
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)

MASK_FILL = (128, 128, 128)  # colour of the patches the VxL mask drops
HEATMAP_ALPHA = 0.5  # weight of the colour map over the photo

TILE_SIZE = 160  # default side of a retrieval tile
BORDER = 4  # frame width around a retrieval tile
QUERY_GAP = 16  # extra space between the query and its results
CAPTION_LINES = 2  # under every tile: a title (class name) and a score
GREEN = (0, 170, 0)  # a result of the query's class
RED = (220, 0, 0)  # a result of another class
BLUE = (0, 90, 220)  # the query's frame
NEUTRAL = (200, 200, 200)  # correctness unknown



# ----------------------------------------------------------------------------- small helpers
def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_uint8_image(image, name: str) -> np.ndarray:
    arr = _numpy(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 [H, W, 3] image, got {arr.dtype} {tuple(arr.shape)}")
    return arr


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int) -> None:
    """Draw one line of ``text`` at ``xy``, shortened with '...' to fit ``width`` pixels."""
    font = _font()
    if draw.textlength(text, font=font) > width:
        while text and draw.textlength(text + "...", font=font) > width:
            text = text[:-1]
        text = text + "..." if text else ""
    if text:
        draw.text(xy, text, fill=TEXT_COLOUR, font=font)


def _fit_tile(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` resized (aspect kept) into a white ``size x size`` square, centred."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(canvas)


def denormalize(images, mean: Sequence[float] = ENCODER_MEAN, std: Sequence[float] = ENCODER_STD) -> np.ndarray:
    """Encoder-normalised images ``[B, 3, H, W]`` (or ``[3, H, W]``) back to ``uint8 [B, H, W, 3]``.

    The exact inverse of ``datasets.transforms.to_tensor`` on uint8 pixels (``x * std + mean``,
    times 255, rounded, clipped to [0, 255]).
    """
    arr = _numpy(images).astype(np.float32)
    single = arr.ndim == 3
    if single:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"denormalize expects [B, 3, H, W] images, got {tuple(arr.shape)}")
    mean_ = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std_ = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    pixels = np.clip(np.rint((arr * std_ + mean_) * 255.0), 0, 255).astype(np.uint8)
    out = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))  # [B, H, W, 3]
    return out[0] if single else out


# ----------------------------------------------------------------------------- VxL mask figure
def mask_figure_size(image_hw: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of :func:`mask_figure` for photos of ``image_hw`` on a ``(rows, cols)`` grid.

    A cell is a title line over three panels side by side (photo, relevance, kept patches).
    """
    h, w = image_hw
    rows, cols = grid
    cell_h, cell_w = TEXT_H + h, 3 * w + 2 * GAP
    return rows * cell_h + (rows + 1) * MARGIN, cols * cell_w + (cols + 1) * MARGIN


def mask_panel_origin(index: int, panel: int, image_hw: tuple[int, int],
                      grid: tuple[int, int]) -> tuple[int, int]:
    """``(top, left)`` of panel ``panel`` (0 photo, 1 relevance, 2 kept) of photo ``index``.

    Photos fill the grid row by row.
    """
    h, w = image_hw
    cols = grid[1]
    r, c = divmod(index, cols)
    top = MARGIN + r * (TEXT_H + h + MARGIN) + TEXT_H
    left = MARGIN + c * (3 * w + 2 * GAP + MARGIN) + panel * (w + GAP)
    return top, left


def _relevance_overlay(photo: np.ndarray, relevance: np.ndarray, cmap) -> np.ndarray:
    """The patch relevances, min-max scaled, bilinearly upsampled and colour-mapped over ``photo``."""
    h, w = photo.shape[:2]
    g = math.isqrt(relevance.size)
    lo, hi = float(relevance.min()), float(relevance.max())
    scaled = (relevance - lo) / (hi - lo) if hi > lo else np.zeros_like(relevance)
    grid = scaled.reshape(g, g).astype(np.float32)  # [g, g] in [0, 1]
    up = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR))  # [H, W]
    heat = cmap(np.clip(up, 0.0, 1.0))[..., :3] * 255.0  # [H, W, 3]
    blended = (1.0 - HEATMAP_ALPHA) * photo.astype(np.float32) + HEATMAP_ALPHA * heat
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _kept_patches(photo: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``photo`` with the dropped patches (``keep == 0``) filled with :data:`MASK_FILL`."""
    h, w = photo.shape[:2]
    g = math.isqrt(keep.size)
    kept = keep.reshape(g, g) > 0.5  # [g, g]
    pixels = kept.repeat(h // g, axis=0).repeat(w // g, axis=1)  # [H, W]
    out = photo.copy()
    out[~pixels] = MASK_FILL
    return out


def mask_figure(photos, relevance, keep_mask, class_names: Sequence[str],
                grid: Optional[tuple[int, int]] = None, *, cmap: str = "jet") -> np.ndarray:
    """VxL sampler picture: per photo, the photo, its relevance map and the kept patches.

    Args:
        photos: ``uint8 [B, H, W, 3]`` — what the sampler saw (e.g. ``denormalize(batch)``).
        relevance: ``[B, N]`` patch relevances (``VxLSampler.relevance``), ``N = g * g``.
        keep_mask: ``[B, N]`` with 1 for kept patches (``VxLSampler.forward``).
        class_names: one name per photo, written over its cell.
        grid: ``(rows, cols)`` of cells, filled row by row; default one photo per row.
        cmap: a matplotlib colour map name for the relevance (``"jet"`` as in CLIP Surgery's figures).

    Returns:
        ``uint8 [H', W', 3]`` of size :func:`mask_figure_size`.
    """
    import matplotlib  # colour maps only: no pyplot, no backend

    photos = _numpy(photos)
    relevance = _numpy(relevance).astype(np.float32)
    keep_mask = _numpy(keep_mask)
    if photos.ndim != 4 or photos.shape[-1] != 3 or photos.dtype != np.uint8:
        raise ValueError(f"photos must be uint8 [B, H, W, 3], got {photos.dtype} {tuple(photos.shape)}")
    b, h, w, _ = photos.shape
    if relevance.shape != keep_mask.shape or relevance.ndim != 2 or relevance.shape[0] != b:
        raise ValueError(f"relevance {tuple(relevance.shape)} and keep_mask {tuple(keep_mask.shape)} "
                         f"must both be [B, N] with B = {b} photos")
    n = relevance.shape[1]
    g = math.isqrt(n)
    if g * g != n or h % g or w % g:
        raise ValueError(f"{n} patches do not tile {h}x{w} photos as a square grid")
    if len(class_names) != b:
        raise ValueError(f"got {b} photos but {len(class_names)} class names")
    grid = grid or (b, 1)
    if grid[0] * grid[1] < b:
        raise ValueError(f"a {grid[0]}x{grid[1]} grid has no room for {b} photos")

    fig_h, fig_w = mask_figure_size((h, w), grid)
    canvas = np.full((fig_h, fig_w, 3), BACKGROUND, dtype=np.uint8)
    colour_map = matplotlib.colormaps[cmap]
    titles = []
    for i in range(b):
        panels = (photos[i], _relevance_overlay(photos[i], relevance[i], colour_map),
                  _kept_patches(photos[i], keep_mask[i]))
        kept = int((keep_mask[i] > 0.5).sum())
        for p, (panel, title) in enumerate(zip(panels, (class_names[i], "relevance", f"kept {kept}/{n}"))):
            top, left = mask_panel_origin(i, p, (h, w), grid)
            canvas[top:top + h, left:left + w] = panel
            titles.append(((left, top - TEXT_H + 1), title))
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for xy, title in titles:
        _draw_text(draw, xy, title, w)
    return np.asarray(image).copy()


# ----------------------------------------------------------------------------- retrieval grid
def retrieval_grid_size(k: int, tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """``(height, width)`` of :func:`retrieval_grid` with ``k`` results."""
    framed = tile_size + 2 * BORDER
    width = 2 * MARGIN + (k + 1) * framed + max(k - 1, 0) * GAP + (QUERY_GAP if k else 0)
    height = 2 * MARGIN + framed + CAPTION_LINES * TEXT_H
    return height, width


def retrieval_tile_origin(i: int, tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """``(top, left)`` of the *frame* of tile ``i`` (0 = the query, 1..K = the results)."""
    framed = tile_size + 2 * BORDER
    if i == 0:
        return MARGIN, MARGIN
    return MARGIN, MARGIN + framed + QUERY_GAP + (i - 1) * (framed + GAP)


def retrieval_grid(query, results: Sequence, *, correct: Optional[Sequence[Optional[bool]]] = None,
                   scores: Optional[Sequence[float]] = None, titles: Optional[Sequence[str]] = None,
                   query_title: str = "query", tile_size: int = TILE_SIZE) -> np.ndarray:
    """One row: the query (blue frame), then the top K results in rank order.

    Args:
        query: ``uint8 [H, W, 3]`` (any size; fitted into a ``tile_size`` square, aspect kept).
        results: K ``uint8 [H, W, 3]`` images, best first.
        correct: per result True (green frame), False (red frame) or None (grey frame: unknown);
            None for all unknown.
        scores: per result its similarity, printed under it.
        titles: per result a caption (e.g. its class name).
        query_title: the query's caption.

    Returns:
        ``uint8 [H', W', 3]`` of size :func:`retrieval_grid_size`.
    """
    k = len(results)
    for name, seq in (("correct", correct), ("scores", scores), ("titles", titles)):
        if seq is not None and len(seq) != k:
            raise ValueError(f"{name} has {len(seq)} entries for {k} results")
    height, width = retrieval_grid_size(k, tile_size)
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    framed = tile_size + 2 * BORDER
    captions = []
    images = [_as_uint8_image(query, "query")] + [_as_uint8_image(r, f"results[{i}]") for i, r in enumerate(results)]
    for i, image in enumerate(images):
        if i == 0:
            frame, lines = BLUE, (query_title, "")
        else:
            ok = None if correct is None else correct[i - 1]
            frame = NEUTRAL if ok is None else (GREEN if ok else RED)
            lines = (titles[i - 1] if titles is not None else f"#{i}",
                     f"cos {scores[i - 1]:.4f}" if scores is not None else "")
        top, left = retrieval_tile_origin(i, tile_size)
        canvas[top:top + framed, left:left + framed] = frame
        canvas[top + BORDER:top + BORDER + tile_size, left + BORDER:left + BORDER + tile_size] = \
            _fit_tile(image, tile_size)
        for j, line in enumerate(lines):
            captions.append(((left, top + framed + j * TEXT_H + 1), line))
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    for xy, line in captions:
        _draw_text(draw, xy, line, framed)
    return np.asarray(pil).copy()


def stack_rows(images: Sequence[np.ndarray]) -> np.ndarray:
    """Stack ``uint8 [h_i, w_i, 3]`` images top to bottom, left-aligned, padded white to one width."""
    if not images:
        raise ValueError("stack_rows needs at least one image")
    width = max(im.shape[1] for im in images)
    rows = [np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255) for im in images]
    return np.concatenate(rows, axis=0)


def save_png(array, path: str | os.PathLike) -> Path:
    """Write a ``uint8 [H, W, 3]`` (or ``[H, W]``) array as a PNG; parent folders are created."""
    arr = _numpy(array)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"save_png needs a uint8 [H, W], [H, W, 3] or [H, W, 4] array, "
                         f"got {arr.dtype} {tuple(arr.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------- ranking, choices
def cosine_ranking(query_feats, gallery_feats) -> tuple[np.ndarray, np.ndarray]:
    """Rank the gallery for each query by cosine similarity, best first.

    Both sides are L2-normalised and multiplied in float32 (as ``utils.metrics``); ties keep the
    gallery order (a stable sort of ``-similarity``, the convention of ``utils.metrics``).

    Returns:
        ``(order [Q, G] int64, similarity [Q, G] float32)``: ``order[q, r]`` is the gallery index
        at rank ``r`` (0-based), ``similarity[q, g]`` the cosine of query q and gallery item g.
    """
    q = F.normalize(torch.as_tensor(_numpy(query_feats), dtype=torch.float32), dim=-1)  # [Q, D]
    g = F.normalize(torch.as_tensor(_numpy(gallery_feats), dtype=torch.float32), dim=-1)  # [G, D]
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"need [Q, D] and [G, D] features, got {tuple(q.shape)} and {tuple(g.shape)}")
    sims = (q @ g.T).numpy()  # [Q, G]
    order = np.argsort(-sims, axis=1, kind="stable")
    return order, sims


def select_items(items: Sequence[tuple], num: int, *, seed: int) -> list[tuple]:
    """Up to ``num`` of the ``(path, class)`` items, spread over the classes, reproducibly.

    The classes are taken in a seeded random order, one item of each in turn (each class's items
    in a seeded random order), so a handful of items shows as many classes as possible. The same
    items and seed always give the same choice.
    """
    rng = np.random.default_rng(seed)
    by_class: dict = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    classes = sorted(by_class, key=str)
    queues = [[by_class[classes[i]][j] for j in rng.permutation(len(by_class[classes[i]]))]
              for i in rng.permutation(len(classes))]
    chosen: list[tuple] = []
    depth = 0
    while len(chosen) < num and any(depth < len(q) for q in queues):
        chosen += [q[depth] for q in queues if depth < len(q)][:num - len(chosen)]
        depth += 1
    return chosen


# ----------------------------------------------------------------------------- TensorBoard summaries
def _load_batch(paths: Sequence, preprocess, image_size: int) -> torch.Tensor:
    from datasets.transforms import load_image

    return torch.stack([preprocess(load_image(p), image_size) for p in paths])  # [B, 3, S, S]


@torch.no_grad()
def retrieval_summary(model: torch.nn.Module, query_items: Sequence[tuple], gallery_feats,
                      gallery_items: Sequence[tuple], *, image_size: int, device, topk: int = 5,
                      max_queries: int = 8, tile_size: int = 96) -> np.ndarray:
    """A few fixed sketch queries, each with its top ``topk`` gallery photos (one row per query).

    Args:
        model: PuXIM (DDP / compiled wrappers are looked through); only ``encode`` is called, on
            the ``len(query_items)`` sketches, in eval mode (the mode is restored).
        query_items: ``(path, class)`` of the sketches to show (the first ``max_queries``); pick
            them once, e.g. ``select_items(query_dataset.items, 4, seed=seed)``, so every epoch shows the same.
        gallery_feats: ``[G, D]`` photo embeddings that evaluation already computed, in the order
            of ``gallery_items`` (``engine.evaluate(..., return_features=True).features["gallery"]``).
        gallery_items: ``(path, class)`` per gallery photo (the gallery dataset's ``items``).
        image_size: the encoder's input size.

    Returns:
        ``uint8 [H, W, 3]``: the rows of :func:`retrieval_grid` stacked.
    """
    from datasets.transforms import load_image, preprocess_sketch
    from utils.checkpoint import strip_wrappers

    query_items = list(query_items)[:max_queries]
    if not query_items:
        raise ValueError("retrieval_summary needs at least one query")
    if len(gallery_items) != len(gallery_feats):
        raise ValueError(f"{len(gallery_feats)} gallery features for {len(gallery_items)} gallery items")
    net = strip_wrappers(model)
    was_training = net.training
    net.eval()
    try:
        sketches = _load_batch([p for p, _ in query_items], preprocess_sketch, image_size)
        q_feats = net.encode(sketches.to(device), "sketch").float().cpu()  # [Q, D]
    finally:
        net.train(was_training)
    order, sims = cosine_ranking(q_feats, gallery_feats)
    k = min(topk, len(gallery_items))
    rows = []
    for qi, (path, qclass) in enumerate(query_items):
        top = order[qi, :k]
        rows.append(retrieval_grid(
            np.asarray(load_image(path)), [np.asarray(load_image(gallery_items[g][0])) for g in top],
            correct=[gallery_items[g][1] == qclass for g in top],
            scores=[float(sims[qi, g]) for g in top], titles=[str(gallery_items[g][1]) for g in top],
            query_title=f"query: {qclass}", tile_size=tile_size))
    return stack_rows(rows)


@torch.no_grad()
def mask_summary(sampler: torch.nn.Module, photo_items: Sequence[tuple], *, image_size: int,
                 max_photos: int = 8, grid: Optional[tuple[int, int]] = None) -> np.ndarray:
    """:func:`mask_figure` of the VxL sampler on a few fixed photos ``(path, class)``.

    The photos go through ``preprocess_photo(image_size)`` exactly as in training; the relevance
    and the keep-mask come from the sampler's own ``relevance`` and ``mask_from_relevance`` (what
    its ``forward`` computes). Default grid: one photo per row up to 4 photos, else two per row.
    """
    from datasets.transforms import preprocess_photo

    photo_items = list(photo_items)[:max_photos]
    if not photo_items:
        raise ValueError("mask_summary needs at least one photo")
    param = next(sampler.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    photos = _load_batch([p for p, _ in photo_items], preprocess_photo, image_size).to(device)
    names = [str(c) for _, c in photo_items]
    relevance = sampler.relevance(photos, names)  # [B, N]
    keep = sampler.mask_from_relevance(relevance)  # [B, N]
    n = len(photo_items)
    if grid is None:
        grid = (n, 1) if n <= 4 else (math.ceil(n / 2), 2)
    return mask_figure(denormalize(photos), relevance, keep, names, grid)
