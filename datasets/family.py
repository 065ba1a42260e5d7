"""A family of small procedural zero-shot SBIR benchmarks, unlike ``datasets.synthetic`` on purpose.

``datasets.synthetic`` draws 34 hand-designed objects in one photo and one sketch style. A preset that
learns only there has learned that benchmark. This module draws benchmarks that differ from it in
everything that matters for learning:

* **classes** are *generated*: class ``k`` of a family seed is a random glyph of 2 to 4 parts
  (circle, square, triangle, diamond, star, ring, cross, bar, half-disc, hexagon) at random offsets,
  sizes and angles, so any number of seen and unseen classes can be drawn, all of the same kind;
* **photo styles** (combinable): ``flat`` (one flat background and fill colour), ``textured``
  (noise and stripe textures), ``cluttered`` (small distractor glyphs of *seen* classes),
  ``noisy`` (Gaussian pixel noise), ``lowcontrast`` (fill close to the background);
* **sketch styles** (combinable): ``clean``, ``jittery`` (wobbling strokes), ``thin`` (1 px),
  ``thick``, ``partial`` (a third of every outline missing);
* **image sizes and modes**: any side (non-square photos too), photos saved as RGB or grey JPEG,
  palette or RGBA PNG, sketches as grey, 1-bit, RGB or transparent RGBA PNG;
* **layouts**: Sketchy (``zeroshot1``), TU-Berlin or QuickDraw, with the list and class files the
  ZSE-SBIR release uses (``datasets.benchmarks.DATASETS`` names them), so a benchmark trains with
  ``train.py --data_path ROOT --dataset D --custom_split``.

Object colours are random per image (the class is in the shape, never in the colour), and every
image ``i`` depends only on ``(spec.seed, class, kind, i)``.

    python -m datasets.family --out /tmp/fam --benchmark cluttered_noisy_sketchy
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .benchmarks import DATASETS
from .filelist import DatasetError

__all__ = ["FamilySpec", "FAMILY", "PHOTO_STYLES", "SKETCH_STYLES", "LAYOUTS", "make_family_benchmark",
           "class_glyph"]

PHOTO_STYLES = ("flat", "textured", "cluttered", "noisy", "lowcontrast")
SKETCH_STYLES = ("clean", "jittery", "thin", "thick", "partial")
PART_KINDS = ("circle", "square", "triangle", "diamond", "star", "ring", "cross", "bar", "halfdisc", "hexagon")
# Single-shape classes (``FamilySpec.parts == (1, 1)``) draw from these: the parts and six more outlines.
SHAPE_KINDS = PART_KINDS + ("pentagon", "ellipse", "arrow", "trapezoid", "ell", "tee")
# layout -> (--dataset, --test_class, sketch folder, photo folder, photo extension)
LAYOUTS = {
    "sketchy": ("sketchy_extend", "test_class_sketchy25", "256x256/sketch/tx_000000000000_ready",
                "256x256/photo/tx_000000000000_ready", ".jpg"),
    "tuberlin": ("tu_berlin", "test_class_tuberlin30", "png_ready", "ImageResized_ready", ".JPEG"),
    "quickdraw": ("Quickdraw", "test_class_quickdraw30", "sketches", "images", ".jpg"),
}
_SUPERSAMPLE = 2
FAMILY_VERSION = 2  # bump whenever the drawing changes: a benchmark drawn by another version is redrawn


@dataclass(frozen=True)
class FamilySpec:
    """One benchmark of the family. ``photo_size`` is (width, height)."""

    name: str
    layout: str = "sketchy"
    seen: int = 9
    unseen: int = 3
    per_class: int = 60  # sketches and photos per class
    photo_styles: tuple[str, ...] = ("flat",)
    sketch_styles: tuple[str, ...] = ("clean",)
    sketch_size: int = 128
    photo_size: tuple[int, int] = (128, 128)
    photo_mode: str = "RGB"  # RGB | L (JPEG) ; P | RGBA (PNG)
    sketch_mode: str = "L"  # L | 1 | RGB | RGBA (PNG)
    seed: int = 0
    parts: tuple[int, int] = (2, 4)  # parts per class glyph, inclusive; (1, 1): each class one simple shape
    extra: dict = field(default_factory=dict, compare=False)

    def check(self) -> None:
        bad = [s for s in self.photo_styles if s not in PHOTO_STYLES]
        bad += [s for s in self.sketch_styles if s not in SKETCH_STYLES]
        if bad:
            raise DatasetError(f"benchmark {self.name!r}: unknown style(s) {bad}; photo styles {PHOTO_STYLES}, "
                               f"sketch styles {SKETCH_STYLES}")
        if self.layout not in LAYOUTS:
            raise DatasetError(f"benchmark {self.name!r}: unknown layout {self.layout!r}; choose {list(LAYOUTS)}")
        lo, hi = self.parts
        if not 1 <= lo <= hi <= 4:
            raise DatasetError(f"benchmark {self.name!r}: parts must be (lo, hi) with 1 <= lo <= hi <= 4, "
                               f"got {self.parts}")
        if hi == 1 and self.seen + self.unseen > len(SHAPE_KINDS):
            raise DatasetError(f"benchmark {self.name!r}: single-shape classes allow at most {len(SHAPE_KINDS)} "
                               f"classes ({list(SHAPE_KINDS)}), got {self.seen + self.unseen}")
        if self.seen < 2 or self.unseen < 2 or self.per_class < 2:
            raise DatasetError(f"benchmark {self.name!r}: needs >= 2 seen and unseen classes and >= 2 images "
                               f"per class")

    @property
    def dataset(self) -> str:
        return LAYOUTS[self.layout][0]

    @property
    def test_class(self) -> str:
        return LAYOUTS[self.layout][1]


# The learning matrix's benchmarks (tools.learning_matrix). ``issue_flat_noisy`` (9 + 3 classes, flat photos with
# distractors and noise) is where a from-scratch ViT collapses without the tiny preset's aids.
FAMILY: dict[str, FamilySpec] = {s.name: s for s in (
    FamilySpec("issue_shapes", "sketchy", 9, 3, 60, ("flat", "cluttered", "noisy"), ("clean",), parts=(1, 1), seed=8),
    FamilySpec("issue_flat_noisy", "sketchy", 9, 3, 60, ("flat", "cluttered", "noisy"), ("clean",)),
    FamilySpec("textured_jittery_tub", "tuberlin", 20, 5, 40, ("textured",), ("jittery",),
               sketch_size=96, photo_size=(96, 96), photo_mode="L", seed=1),
    FamilySpec("cluttered_thin_qd", "quickdraw", 40, 8, 30, ("cluttered",), ("thin",),
               sketch_size=64, photo_size=(80, 64), sketch_mode="1", seed=2),
    FamilySpec("lowcontrast_thick", "sketchy", 6, 3, 100, ("lowcontrast",), ("thick",),
               sketch_size=160, photo_size=(160, 160), seed=3),
    FamilySpec("noisy_partial_tub", "tuberlin", 12, 4, 50, ("noisy",), ("partial",),
               photo_mode="RGBA", sketch_mode="RGBA", seed=4),
    FamilySpec("flat_jittery_thin_qd", "quickdraw", 30, 6, 40, ("flat",), ("jittery", "thin"),
               sketch_size=100, photo_size=(100, 100), photo_mode="P", seed=5),
    FamilySpec("textured_cluttered_wide", "sketchy", 16, 8, 30, ("textured", "cluttered"), ("clean",),
               sketch_size=200, photo_size=(200, 150), sketch_mode="RGB", seed=6),
    FamilySpec("lowcontrast_noisy_partial", "tuberlin", 24, 4, 60, ("lowcontrast", "noisy"),
               ("partial", "thick"), sketch_size=112, photo_size=(112, 112), seed=7),
)}


# --------------------------------------------------------------------------------------------- glyphs
def class_glyph(family_seed: int, class_index: int, parts: tuple[int, int] = (2, 4)) -> list[dict]:
    """The parts of class ``class_index``: kind, centre (x, y), size, angle, in unit object coordinates.

    With ``parts == (1, 1)`` class ``k`` is the ``k``-th shape of a seeded permutation of
    ``SHAPE_KINDS`` (so no two classes share a shape); otherwise 2 to 4 parts (``parts``) of
    ``PART_KINDS`` at random offsets.
    """
    if tuple(parts) == (1, 1):
        order = np.random.default_rng([family_seed, 104729]).permutation(len(SHAPE_KINDS))
        rng = np.random.default_rng([family_seed, 7919, class_index])
        return [dict(kind=SHAPE_KINDS[order[class_index]], centre=(0.0, 0.0), size=float(rng.uniform(0.28, 0.36)),
                     angle=float(rng.uniform(0, 360)))]
    rng = np.random.default_rng([family_seed, 7919, class_index])
    n_parts = int(rng.integers(parts[0], parts[1] + 1))
    kinds = rng.choice(len(PART_KINDS), size=n_parts, replace=False)
    glyph = []
    for j, k in enumerate(kinds):
        centre = (0.0, 0.0) if j == 0 else tuple(rng.uniform(-0.3, 0.3, size=2))
        size = rng.uniform(0.28, 0.42) if j == 0 else rng.uniform(0.12, 0.28)
        glyph.append(dict(kind=PART_KINDS[k], centre=centre, size=float(size), angle=float(rng.uniform(0, 360))))
    return glyph


def _regular(n: int, r: float, phase: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False) + phase
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _outlines(kind: str, size: float) -> list[tuple[np.ndarray, bool]]:
    """Closed or open polylines of one part around the origin: [(points [n, 2], closed)]."""
    s = size
    if kind == "circle":
        return [(_regular(48, s), True)]
    if kind == "ring":
        return [(_regular(48, s), True), (_regular(36, 0.55 * s), True)]
    if kind == "square":
        return [(_regular(4, s, math.pi / 4), True)]
    if kind == "diamond":
        return [(_regular(4, s) * [0.6, 1.0], True)]
    if kind == "triangle":
        return [(_regular(3, s, -math.pi / 2), True)]
    if kind == "hexagon":
        return [(_regular(6, s), True)]
    if kind == "star":
        pts = _regular(10, s, -math.pi / 2)
        pts[1::2] *= 0.45
        return [(pts, True)]
    if kind == "cross":
        a, b = s, 0.3 * s
        return [(np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                           [-a, b], [-a, -b], [-b, -b]]), True)]
    if kind == "bar":
        return [(np.array([[-s, -0.2 * s], [s, -0.2 * s], [s, 0.2 * s], [-s, 0.2 * s]]), True)]
    if kind == "pentagon":
        return [(_regular(5, s, -math.pi / 2), True)]
    if kind == "ellipse":
        return [(_regular(48, s) * [1.0, 0.55], True)]
    if kind == "arrow":
        a, b = s, 0.25 * s
        return [(np.array([[-a, -b], [0.2 * a, -b], [0.2 * a, -2.2 * b], [a, 0], [0.2 * a, 2.2 * b], [0.2 * a, b],
                           [-a, b]]), True)]
    if kind == "trapezoid":
        return [(np.array([[-s, 0.6 * s], [s, 0.6 * s], [0.45 * s, -0.6 * s], [-0.45 * s, -0.6 * s]]), True)]
    if kind == "ell":
        a, b = s, 0.35 * s
        return [(np.array([[-a, -a], [-a + b, -a], [-a + b, a - b], [a, a - b], [a, a], [-a, a]]), True)]
    if kind == "tee":
        a, b = s, 0.3 * s
        return [(np.array([[-a, -a], [a, -a], [a, -a + b], [b / 2, -a + b], [b / 2, a], [-b / 2, a],
                           [-b / 2, -a + b], [-a, -a + b]]), True)]
    if kind == "halfdisc":
        t = np.linspace(0, math.pi, 24)
        return [(np.stack([s * np.cos(t), -s * np.sin(t)], 1), True)]
    raise ValueError(kind)


def _instance(parts: list[dict], rng: np.random.Generator, centre, scale) -> list[tuple[np.ndarray, bool]]:
    """Polylines of one drawn instance: the glyph under a random pose, each part slightly displaced."""
    rot = math.radians(rng.uniform(-25, 25))
    aspect = math.exp(rng.uniform(-0.15, 0.15))
    c, s = math.cos(rot), math.sin(rot)
    lines = []
    for part in parts:
        pa = math.radians(part["angle"] + rng.uniform(-10, 10))
        pr = np.array([[math.cos(pa), -math.sin(pa)], [math.sin(pa), math.cos(pa)]])
        offset = np.array(part["centre"]) + rng.normal(0, 0.02, 2)
        for pts, closed in _outlines(part["kind"], part["size"] * rng.uniform(0.9, 1.1)):
            p = pts @ pr.T + offset
            p = p * [aspect, 1 / aspect]
            p = p @ np.array([[c, -s], [s, c]]).T
            lines.append((np.asarray(centre) + scale * p, closed))
    return lines


# --------------------------------------------------------------------------------------------- rendering
def _resample(pts: np.ndarray, closed: bool, step: float) -> np.ndarray:
    if closed:
        pts = np.vstack([pts, pts[:1]])
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    cum = np.concatenate([[0], np.cumsum(seg)])
    n = max(int(cum[-1] / step), 2)
    t = np.linspace(0, cum[-1], n)
    return np.stack([np.interp(t, cum, pts[:, 0]), np.interp(t, cum, pts[:, 1])], 1)


def _draw_sketch(parts, rng, spec: FamilySpec) -> Image.Image:
    S = spec.sketch_size * _SUPERSAMPLE
    styles = set(spec.sketch_styles)
    width = 1 * _SUPERSAMPLE if "thin" in styles else max(2, round(S * (0.045 if "thick" in styles else 0.018)))
    img = Image.new("L", (S, S), 255)
    draw = ImageDraw.Draw(img)
    for pts, closed in _instance(parts, rng, centre=(S / 2 + rng.normal(0, S * 0.04), S / 2 + rng.normal(0, S * 0.04)),
                                 scale=S * rng.uniform(0.85, 1.1)):
        pts = _resample(pts, closed, step=S / 80)
        if "jittery" in styles:  # a smooth wobble along the stroke plus per-point tremor
            wave = np.cumsum(rng.normal(0, S * 0.004, pts.shape), axis=0)
            pts = pts + wave - wave.mean(0) + rng.normal(0, S * 0.003, pts.shape)
        if "partial" in styles:  # leave out one contiguous third of the outline
            n = len(pts)
            gap_end = int(rng.integers(0, n)) + n // 3
            pts = np.roll(pts, -gap_end, axis=0)[: n - n // 3]
        if len(pts) >= 2:
            draw.line([tuple(p) for p in pts], fill=int(rng.integers(0, 60)), width=width, joint="curve")
    img = img.resize((spec.sketch_size, spec.sketch_size), Image.BILINEAR)
    if spec.sketch_mode == "1":
        return img.point(lambda v: 255 if v > 160 else 0).convert("1")
    if spec.sketch_mode == "RGBA":  # strokes on a transparent background
        arr = np.asarray(img)
        rgba = np.zeros(arr.shape + (4,), np.uint8)
        rgba[..., 3] = 255 - arr
        return Image.fromarray(rgba, "RGBA")
    return img.convert(spec.sketch_mode)


def _colour(rng, lo=0.0, hi=1.0) -> np.ndarray:
    return rng.uniform(lo, hi, 3)


def _texture(rng, h, w, base) -> np.ndarray:
    """Smooth noise blended with stripes of a random period and angle, around ``base`` ([h, w, 3] in [0, 1])."""
    cells = int(rng.integers(3, 9))
    noise = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    noise = np.asarray(noise, np.float32)[..., None] / 255 - 0.5
    yy, xx = np.mgrid[0:h, 0:w]
    a = rng.uniform(0, math.pi)
    stripes = np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / rng.uniform(6, 20))[..., None]
    other = _colour(rng)
    return np.clip(base + 0.5 * noise + 0.25 * stripes * (other - base), 0, 1)


def _fill(canvas: np.ndarray, lines, fill: np.ndarray, outline: np.ndarray | None, width: int) -> None:
    """Paint the closed polylines (even-odd over the parts) with ``fill`` ([h, w, 3] or [3])."""
    h, w = canvas.shape[:2]
    mask = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(mask)
    for pts, closed in lines:
        if closed:
            d.polygon([tuple(p) for p in pts], fill=255)
    m = np.asarray(mask, np.float32)[..., None] / 255
    canvas[:] = canvas * (1 - m) + fill * m
    if outline is not None:
        edge = Image.new("L", (w, h), 0)
        d = ImageDraw.Draw(edge)
        for pts, closed in lines:
            d.line([tuple(p) for p in np.vstack([pts, pts[:1]] if closed else pts)], fill=255, width=width)
        e = np.asarray(edge, np.float32)[..., None] / 255
        canvas[:] = canvas * (1 - e) + outline * e


def _draw_photo(parts, rng, spec: FamilySpec, distractors: list[list[dict]]) -> Image.Image:
    W, H = (v * _SUPERSAMPLE for v in spec.photo_size)
    styles = set(spec.photo_styles)
    bg = _colour(rng)
    canvas = np.empty((H, W, 3), np.float32)
    canvas[:] = bg
    if "textured" in styles:
        canvas[:] = _texture(rng, H, W, bg)
    side = min(W, H)
    if "cluttered" in styles:
        for _ in range(int(rng.integers(2, 5))):
            g = distractors[int(rng.integers(len(distractors)))]
            corner = (rng.uniform(0.1, 0.9) * W, rng.choice([0.12, 0.88]) * H)
            _fill(canvas, _instance(g, rng, corner, side * rng.uniform(0.25, 0.4)), _colour(rng), None, 1)
    lines = _instance(parts, rng, centre=(W / 2 + rng.normal(0, W * 0.05), H / 2 + rng.normal(0, H * 0.05)),
                      scale=side * rng.uniform(0.75, 1.0))
    outline = None if "lowcontrast" in styles or rng.random() < 0.4 else np.clip(_colour(rng, 0, 0.3), 0, 1)
    start = 0
    for part in parts:  # each part in a colour of its own, so its edges show inside the object too
        n_lines = len(_outlines(part["kind"], 1.0))
        if "lowcontrast" in styles:
            fill = np.clip(bg + rng.choice([-1, 1]) * rng.uniform(0.08, 0.16) + rng.normal(0, 0.03, 3), 0, 1)
        else:
            fill = _colour(rng)
        if "textured" in styles:
            fill = _texture(rng, H, W, fill)
        _fill(canvas, lines[start:start + n_lines], fill, outline, max(1, side // 60))
        start += n_lines
    if "noisy" in styles:
        canvas += rng.normal(0, 0.12, canvas.shape).astype(np.float32)
    img = Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8), "RGB")
    img = img.filter(ImageFilter.GaussianBlur(0.6)).resize(spec.photo_size, Image.BILINEAR)
    if spec.photo_mode == "P":
        return img.convert("P", palette=Image.ADAPTIVE, colors=64)
    if spec.photo_mode == "RGBA":
        return img.convert("RGBA")
    return img.convert(spec.photo_mode)


# --------------------------------------------------------------------------------------------- writing
def _class_names(spec: FamilySpec) -> list[str]:
    # Names unlike any real or synthetic class, some with a space (as "alarm clock").
    return [f"glyph {i:02d}" if i % 5 == 4 else f"glyph_{i:02d}" for i in range(spec.seen + spec.unseen)]


def make_family_benchmark(root: str | Path, spec: FamilySpec, *, progress: bool = False) -> Path:
    """Draw ``spec`` under ``root`` (the data root) and write its split lists; return ``root``.

    Seen classes are the first ``spec.seen`` glyphs of the family seed, unseen the next ones. A
    ``family.json`` stamp records the spec; a folder holding the same stamp is left as it is.
    """
    spec.check()
    root = Path(root)
    dataset, test_class, sketch_dir, photo_dir, photo_ext = LAYOUTS[spec.layout]
    split = DATASETS[dataset][test_class]
    stamp = root / "family.json"
    record = {k: v for k, v in asdict(spec).items() if k != "extra"}
    record["photo_size"] = list(spec.photo_size)
    record["parts"] = list(spec.parts)
    record["version"] = FAMILY_VERSION
    record = json.loads(json.dumps(record))
    if stamp.is_file() and json.loads(stamp.read_text()) == record:
        return root
    if spec.photo_mode in ("P", "RGBA"):
        photo_ext = ".png"
    names = _class_names(spec)
    glyphs = [class_glyph(spec.seed, i, spec.parts) for i in range(len(names))]
    seen_glyphs = glyphs[:spec.seen]
    base = root / split.dataset_dir
    lists = {"sketch_train": [], "photo_train": [], "sketch_zero": [], "photo_zero": []}
    from utils.progress import progress_bar

    for ci in progress_bar(range(len(names)), desc=f"drawing {spec.name}", enabled=progress, leave=False):
        name, unseen = names[ci], ci >= spec.seen
        label = ci - spec.seen if unseen else ci
        for kind, folder, ext in (("sketch", sketch_dir, ".png"), ("photo", photo_dir, photo_ext)):
            out = base / folder / name
            out.mkdir(parents=True, exist_ok=True)
            distractors = [g for j, g in enumerate(seen_glyphs) if j != ci] or seen_glyphs
            for i in range(spec.per_class):
                rng = np.random.default_rng([spec.seed, ci, 0 if kind == "sketch" else 1, i])
                img = (_draw_sketch(glyphs[ci], rng, spec) if kind == "sketch"
                       else _draw_photo(glyphs[ci], rng, spec, distractors))
                rel = f"{folder}/{name}/{name.replace(' ', '_')}_{i:04d}{ext}"
                img.save(base / rel, quality=92) if ext.lower() in (".jpg", ".jpeg") else img.save(base / rel)
                lists[f"{kind}_{'zero' if unseen else 'train'}"].append(f"{rel} {label}")
    split_dir = base / split.split_dir
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / split.seen_class_file).write_text("".join(f"{n} {i}\n" for i, n in enumerate(names[:spec.seen])))
    (split_dir / split.unseen_class_file).write_text(
        "".join(f"{n} {i}\n" for i, n in enumerate(names[spec.seen:])))
    for kind, fname in split.list_files.items():
        (split_dir / fname).write_text("\n".join(lists[kind]) + "\n")
    stamp.write_text(json.dumps(record, indent=1))
    return root


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("draw one benchmark of the procedural family")
    p.add_argument("--out", required=True, help="data root to draw into")
    p.add_argument("--benchmark", required=True, choices=sorted(FAMILY))
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    spec = FAMILY[args.benchmark]
    make_family_benchmark(args.out, spec, progress=True)
    print(f"drew {spec.name} into {args.out}: train with  python train.py --data_path {args.out} "
          f"--dataset {spec.dataset} --test_class {spec.test_class} --custom_split --arch tiny")


if __name__ == "__main__":
    main()
