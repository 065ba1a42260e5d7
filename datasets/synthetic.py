"""A built-in, procedurally drawn zero-shot sketch/photo benchmark.

Someone who clones the repository without any data can still run the whole pipeline: this module
draws a small zero-shot SBIR benchmark and writes it to disk in the **Sketchy layout** of
ZSE-SBIR/SAKE, so it goes through exactly the same readers as the real dataset::

    ROOT/synthetic.json                                   stamp: version, seed, counts, classes
    ROOT/Sketchy/256x256/sketch/tx_000000000000_ready/<class>/<class>_<i>.png
    ROOT/Sketchy/256x256/photo/tx_000000000000_ready/<class>/<class>_<i>.jpg
    ROOT/Sketchy/zeroshot1/cname_cid.txt, cname_cid_zero.txt            <name> <id>
    ROOT/Sketchy/zeroshot1/sketch_tx_000000000000_ready_filelist_{train,zero}.txt
    ROOT/Sketchy/zeroshot1/all_photo_filelist_{train,zero}.txt          <path> <label>

The folder is called ``256x256`` only because Sketchy's is; the images are ``size`` x ``size``
(128 by default) to keep the benchmark small. Paths in the lists are relative to ``ROOT/Sketchy``.

Every class is a small function that returns the object as a list of shared primitives (circles,
ellipses, rectangles, triangles, polygons, lines, arcs) with a class-specific arrangement and random
proportions. Unseen classes are made of the same primitives as seen ones (a bicycle's wheels are a
car's, a mushroom's cap is an umbrella's canopy), so what an encoder learns on seen classes transfers.

* Sketches: dark outline strokes on white, of varied width, wobbling, each part slightly misplaced,
  random pose (scale, rotation, translation, aspect, mirror), closed strokes that overshoot or do
  not quite close, sometimes a missing part or an extra stroke (hatching, a ground line).
* Photos: the same object, large and central, filled with textured colour (flat, shading gradient,
  stripes, spots, mottled) and edged by a darker outline, with one or two smaller distractor objects
  of *other, seen* classes near the corners (never unseen ones, so seen-class training never shows
  an unseen object): the situation PuXIM's purification is built for. Backgrounds range from plain
  near-white "studio" ones (about a third, as in many Sketchy photos) through soft gradients and
  blotches to cluttered stripes and shapes. The plain ones matter: they bridge the two domains.
  Without them an encoder trained from scratch for a few minutes aligns no sketch with any photo,
  whereas with them a small CNN (tools.cnn_reference) learns to align them within minutes.

Generation is deterministic: image ``i`` of a class and kind depends only on
``(seed, class index in CLASSES, kind, i)``, so the output is byte-identical for the same seed,
:data:`SYNTHETIC_VERSION` (bump it whenever the drawing changes) and numpy/Pillow versions,
whatever subset of classes or counts is drawn. The default benchmark (26 seen classes x 60 sketches
+ 60 photos, 8 unseen classes x 40 + 40, 128x128) takes about half a minute on one core and about 20 MB.

    python -m datasets.synthetic --out /tmp/synth --preview preview.png
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SYNTHETIC_VERSION", "CLASSES", "SEEN_CLASSES", "UNSEEN_CLASSES", "SyntheticBenchmarkError",
    "draw_sketch", "draw_photo", "make_synthetic_benchmark", "default_cache_dir",
    "ensure_synthetic_benchmark", "save_preview",
]

SYNTHETIC_VERSION = 1
"""Bump whenever drawing or layout changes: cached benchmarks with another version are redrawn."""

log = logging.getLogger(__name__)

SKETCH_DIR = "256x256/sketch/tx_000000000000_ready"
PHOTO_DIR = "256x256/photo/tx_000000000000_ready"
SPLIT_DIR = "zeroshot1"
STAMP_NAME = "synthetic.json"
_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased strokes and edges


class SyntheticBenchmarkError(RuntimeError):
    """Raised for a bad request (unknown class, empty split, non-positive count)."""


# ----------------------------------------------------------------------------------------------
# Primitives. Object coordinates: x to the right, y downwards, the object roughly in [-1, 1]^2.
# Angles are in degrees, measured like the image's y axis: 90 is down, 270 is up.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One stroke of a sketch / one painted region of a photo."""

    points: np.ndarray  # [N, 2] object coordinates
    closed: bool = True  # outline returns to its start
    filled: bool = True  # photo: fill the outline with a texture (closed only); else a thick line
    role: int = 0  # colour slot in the photo: 0 body, 1 second part, 2 accent, 3 dark detail
    essential: bool = True  # a sketcher may leave out a non-essential part


def _arc_points(cx, cy, rx, ry, a0=0.0, a1=360.0, n=40) -> np.ndarray:
    t = np.radians(np.linspace(a0, a1, n, endpoint=abs(a1 - a0) < 360))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _circle(cx, cy, r, **kw) -> Part:
    return Part(_arc_points(cx, cy, r, r), **kw)


def _ellipse(cx, cy, rx, ry, angle=0.0, **kw) -> Part:
    pts = _arc_points(0, 0, rx, ry)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return Part(pts @ np.array([[c, s], [-s, c]]) + (cx, cy), **kw)


def _poly(pts, **kw) -> Part:
    return Part(np.asarray(pts, dtype=np.float64), **kw)


def _rect(x0, y0, x1, y1, **kw) -> Part:
    return _poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], **kw)


def _line(pts, **kw) -> Part:
    return Part(np.asarray(pts, dtype=np.float64), closed=False, filled=False, **kw)


def _arc(cx, cy, rx, ry, a0, a1, **kw) -> Part:
    return Part(_arc_points(cx, cy, rx, ry, a0, a1, n=24), closed=False, filled=False, **kw)


def _radial(r_of_t: Callable[[np.ndarray], np.ndarray], cx=0.0, cy=0.0, sx=1.0, sy=1.0, n=72):
    """Closed outline with radius r(t) (t in radians) around (cx, cy), stretched by (sx, sy)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = r_of_t(t)
    return np.stack([cx + sx * r * np.cos(t), cy + sy * r * np.sin(t)], axis=1)


# ----------------------------------------------------------------------------------------------
# The classes. Each returns its parts in painting order (background parts first).
# ----------------------------------------------------------------------------------------------
def _sun(r):
    rad = r.uniform(0.35, 0.5)
    parts = [_circle(0, 0, rad)]
    n, phase = int(r.integers(7, 13)), r.uniform(0, 360)
    inner, outer = rad + r.uniform(0.06, 0.14), r.uniform(0.82, 1.0)
    for k in range(n):
        a = math.radians(phase + 360 * k / n)
        parts.append(_line([(inner * math.cos(a), inner * math.sin(a)),
                            (outer * math.cos(a), outer * math.sin(a))], essential=False))
    return parts


def _moon(r):
    R, a = 0.85, r.uniform(40, 60)
    thick = r.uniform(0.3, 0.5) * R
    cx_in = R * math.cos(math.radians(a))
    outer = _arc_points(0, 0, R, R, a, 360 - a, n=40)
    inner = _arc_points(cx_in, 0, R * math.cos(math.radians(a)) + R - thick,
                        R * math.sin(math.radians(a)), 270, 90, n=30)
    parts = [_poly(np.vstack([outer, inner]))]
    if r.random() < 0.4:  # a little star beside the moon
        parts.append(_poly(_star_points(0.55, -0.55, 0.16, 0.07, 5), role=2, essential=False))
    return parts


def _star_points(cx, cy, R, rin, n):
    t = np.radians(-90 + np.arange(2 * n) * 180 / n)
    rr = np.where(np.arange(2 * n) % 2 == 0, R, rin)
    return np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], axis=1)


def _star(r):
    n = 5 if r.random() < 0.8 else 6
    return [_poly(_star_points(0, 0.05, 0.95, 0.95 * r.uniform(0.36, 0.5), n))]


def _house(r):
    w, eave, top = r.uniform(0.5, 0.7), r.uniform(-0.2, 0.05), r.uniform(-0.95, -0.65)
    parts = [_rect(-w, eave, w, 0.9), _poly([(-w - 0.15, eave), (0, top), (w + 0.15, eave)], role=1)]
    if r.random() < 0.5:
        parts.insert(0, _rect(w * 0.45, top * 0.8, w * 0.45 + 0.16, eave - 0.05, role=1,
                              essential=False))  # chimney, behind the roof
    dx = r.uniform(-0.25, 0.25) * w
    parts.append(_rect(dx - 0.14, 0.45, dx + 0.14, 0.9, role=2))
    side = -1 if dx > 0 else 1
    parts.append(_rect(side * w * 0.55 - 0.13, 0.1, side * w * 0.55 + 0.13, 0.34, role=3,
                       essential=False))
    return parts


def _tree(r):
    tw = r.uniform(0.08, 0.16)
    trunk = _rect(-tw, 0.2, tw, 0.95, role=1)
    style = r.random()
    if style < 0.35:  # pine: stacked triangles
        crown = [_poly([(-0.75 + 0.15 * k, 0.35 - 0.4 * k), (0, -0.45 - 0.25 * k),
                        (0.75 - 0.15 * k, 0.35 - 0.4 * k)]) for k in range(2)]
    else:
        k = int(r.integers(6, 10))
        bumps = r.uniform(0.08, 0.18)
        crown = [_poly(_radial(lambda t: 0.6 * (1 - bumps + bumps * np.abs(np.cos(k * t / 2))),
                               cy=-0.3, sx=r.uniform(0.9, 1.25)))]
    return [trunk, *crown]


def _fish(r):
    rx, ry = r.uniform(0.5, 0.65), r.uniform(0.26, 0.4)
    tail = _poly([(rx - 0.2, 0), (0.95, -r.uniform(0.25, 0.4)), (0.95, r.uniform(0.25, 0.4))], role=1)
    parts = [tail, _ellipse(-0.1, 0, rx, ry),
             _circle(-0.1 - rx * 0.6, -ry * 0.25, 0.06, role=3)]
    if r.random() < 0.6:
        parts.insert(1, _poly([(-0.2, -ry + 0.05), (0.05, -ry - 0.22), (0.2, -ry + 0.05)], role=1,
                              essential=False))
    return parts


def _cup(r):
    top, bot = r.uniform(0.4, 0.55), r.uniform(0.3, 0.42)
    parts = [_arc(top - 0.05, 0.05, 0.35, 0.3, -80, 80, role=0),
             _poly([(-top, -0.55), (top, -0.55), (bot, 0.6), (-bot, 0.6)])]
    if r.random() < 0.5:
        parts.insert(0, _ellipse(0, 0.65, 0.7, 0.1, role=1, essential=False))  # saucer
    if r.random() < 0.4:
        parts.append(_line([(-0.1, -0.65), (-0.18, -0.8), (-0.1, -0.95)], role=1, essential=False))
    return parts


def _key(r):
    hr = r.uniform(0.25, 0.36)
    sh = r.uniform(0.05, 0.09)
    parts = [_rect(-0.5, -sh, 0.95, sh), _circle(-0.55, 0, hr),
             _circle(-0.55, 0, hr * 0.4, role=3, essential=False)]
    for k in range(int(r.integers(2, 4))):
        x = 0.85 - 0.18 * k
        parts.append(_rect(x - 0.06, sh, x + 0.05, sh + r.uniform(0.1, 0.22)))
    return parts


def _umbrella(r):
    R, h = r.uniform(0.8, 0.95), r.uniform(0.5, 0.7)
    n = int(r.integers(3, 6))
    dome = _arc_points(0, 0, R, h, 180, 360, n=40)
    xs = np.linspace(R, -R, n + 1)
    scallops = [_arc_points((xs[i] + xs[i + 1]) / 2, 0, (xs[i] - xs[i + 1]) / 2, 0.1, 0, 180, n=8)[::-1]
                for i in range(n)]
    canopy = _poly(np.vstack([dome, *scallops]))
    return [_line([(0, -h - 0.1), (0, 0.75)], role=3), canopy,
            _arc(-0.13, 0.75, 0.13, 0.13, 0, 180, role=3)]


def _car(r):
    top = r.uniform(-0.5, -0.35)
    body = _rect(-0.92, -0.05, 0.92, r.uniform(0.35, 0.5))
    cabin = _poly([(-0.55, -0.05), (-0.35, top), (0.3, top), (0.55, -0.05)], role=1)
    wr = r.uniform(0.17, 0.24)
    parts = [cabin, body, _circle(-0.52, 0.45, wr, role=3), _circle(0.52, 0.45, wr, role=3)]
    if r.random() < 0.5:
        parts.append(_line([(0, top), (0, -0.05)], essential=False))
    return parts


def _apple(r):
    dent = r.uniform(0.12, 0.25)
    body = _radial(lambda t: 0.72 * (1 - dent * np.exp(-((t - 1.5 * np.pi) / 0.45) ** 2)
                                     - 0.5 * dent * np.exp(-((t - 0.5 * np.pi) / 0.35) ** 2)),
                   cy=0.1, sx=r.uniform(0.95, 1.15))
    parts = [_poly(body), _line([(0, -0.45), (r.uniform(0, 0.15), -0.85)], role=3)]
    if r.random() < 0.7:
        parts.append(_poly(_teardrop(0.2, -0.75, 0.1, 0.3, angle=r.uniform(50, 80)), role=2,
                           essential=False))
    return parts


def _teardrop(cx, cy, w, h, angle=0.0, n=40):
    """Drop with its point up (before rotation by ``angle``), centred at (cx, cy)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([w * np.sin(t) * np.sin(t / 2), -h * np.cos(t) / 2], axis=1)
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return pts @ np.array([[c, s], [-s, c]]) + (cx, cy)


def _bell(r):
    fl, tw = r.uniform(0.7, 0.9), r.uniform(0.42, 0.52)
    outline = np.vstack([[(-fl, 0.5), (-tw - 0.07, 0.3), (-tw, -0.2)],
                         _arc_points(0, -0.2, tw, tw * 1.1, 180, 360, n=24)[1:],
                         [(tw, -0.2), (tw + 0.07, 0.3), (fl, 0.5)]])
    return [_circle(0, 0.62, r.uniform(0.1, 0.16), role=3), _poly(outline),
            _arc(0, -0.8, 0.1, 0.1, 180, 360, role=3, essential=False)]


def _heart(r):
    t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x * r.uniform(0.95, 1.15), y + 2], axis=1) / 17
    parts = [_poly(pts)]
    if r.random() < 0.3:
        parts.append(_line([(-0.7, 0.55), (0.7, -0.55)], role=3, essential=False))
    return parts


def _arrow(r):
    sw, hw = r.uniform(0.04, 0.08), r.uniform(0.25, 0.38)
    hb = r.uniform(0.35, 0.5)
    parts = [_rect(-0.92, -sw, hb + 0.02, sw), _poly([(hb, -hw), (0.95, 0), (hb, hw)], role=1)]
    for dx in (0.0, 0.15):
        parts.append(_line([(-0.92 + dx, 0), (-1.0 + dx, -0.2)], role=2, essential=False))
        parts.append(_line([(-0.92 + dx, 0), (-1.0 + dx, 0.2)], role=2, essential=False))
    return parts


def _cloud(r):
    k, b = int(r.integers(5, 8)), r.uniform(0.15, 0.3)
    pts = _radial(lambda t: 0.6 * (1 - b + b * np.abs(np.cos(k * t / 2))), sx=1.5, sy=1.0)
    pts[:, 1] = np.minimum(pts[:, 1], 0.4)  # flat bottom
    return [_poly(pts)]


def _flower(r):
    cy, cr = r.uniform(-0.45, -0.3), r.uniform(0.12, 0.18)
    n, pr = int(r.integers(5, 9)), r.uniform(0.14, 0.2)
    parts = [_line([(0, cy), (r.uniform(-0.1, 0.1), 0.95)], role=1)]
    if r.random() < 0.7:
        parts.append(_poly(_teardrop(0.18, 0.45, 0.12, 0.35, angle=60), role=1, essential=False))
    phase = r.uniform(0, 360)
    for k in range(n):
        a = math.radians(phase + 360 * k / n)
        d = cr + pr * 0.9
        parts.append(_ellipse(d * math.cos(a), cy + d * math.sin(a), pr * 1.1, pr * 0.7,
                              angle=math.degrees(a)))
    parts.append(_circle(0, cy, cr, role=2))
    return parts


def _boat(r):
    dk = r.uniform(0.2, 0.35)
    hull = _poly([(-0.92, dk), (0.92, dk), (0.6, 0.68), (-0.6, 0.68)], role=1)
    parts = [_line([(0, dk), (0, -0.92)], role=3),
             _poly([(0.06, -0.88), (0.06, dk - 0.08), (r.uniform(0.55, 0.75), dk - 0.08)]), hull]
    if r.random() < 0.5:
        parts.insert(1, _poly([(-0.06, -0.7), (-0.06, dk - 0.08), (-0.5, dk - 0.08)], essential=False))
    if r.random() < 0.4:
        parts.append(_line([(-0.95, 0.8), (-0.5, 0.72), (0, 0.8), (0.5, 0.72), (0.95, 0.8)], role=2,
                           essential=False))
    return parts


def _ladder(r):
    w, n = r.uniform(0.3, 0.45), int(r.integers(4, 8))
    parts = [_line([(-w, -0.95), (-w, 0.95)]), _line([(w, -0.95), (w, 0.95)])]
    for y in np.linspace(-0.75, 0.75, n):
        parts.append(_line([(-w, y), (w, y)], role=0, essential=bool(abs(y) < 0.5)))
    return parts


def _clock(r):
    R = r.uniform(0.82, 0.92)
    parts = [_circle(0, 0, R), _circle(0, 0, R * 0.85, role=1, filled=False, essential=False)]
    n_ticks = 12 if r.random() < 0.5 else 4
    for k in range(n_ticks):
        a = math.radians(k * 360 / n_ticks)
        parts.append(_line([(0.68 * R * math.cos(a), 0.68 * R * math.sin(a)),
                            (0.78 * R * math.cos(a), 0.78 * R * math.sin(a))], role=3, essential=False))
    for length in (0.45, 0.68):
        a = math.radians(r.uniform(0, 360))
        parts.append(_line([(0, 0), (length * R * math.cos(a), length * R * math.sin(a))], role=3))
    return parts


def _hat(r):
    bw = r.uniform(0.8, 0.98)
    brim = _ellipse(0, 0.45, bw, r.uniform(0.12, 0.2), role=1)
    if r.random() < 0.5:  # top hat
        cw = r.uniform(0.42, 0.55)
        crown = _poly([(-cw, 0.45), (-cw * 0.9, -0.6), (cw * 0.9, -0.6), (cw, 0.45)])
    else:  # bowler
        crown = _poly(np.vstack([_arc_points(0, 0.45, 0.55, r.uniform(0.75, 0.95), 180, 360, n=30),
                                 [(0.55, 0.45)]]))
    return [brim, crown, _rect(-0.5, 0.2, 0.5, 0.36, role=2, essential=False)]


def _lamp(r):
    tw, bw = r.uniform(0.2, 0.35), r.uniform(0.55, 0.7)
    return [_line([(0, -0.3), (0, 0.8)], role=3),
            _poly([(-tw, -0.92), (tw, -0.92), (bw, -0.3), (-bw, -0.3)]),
            _rect(-0.4, 0.8, 0.4, 0.95, role=1)]


def _table(r):
    ty, lw = r.uniform(-0.35, -0.15), r.uniform(0.05, 0.09)
    parts = [_rect(-0.95, ty, 0.95, ty + 0.14)]
    for x in (-0.8, 0.8 - lw):
        parts.append(_rect(x, ty + 0.14, x + lw, 0.9, role=1))
    if r.random() < 0.5:
        for x in (-0.5, 0.5 - lw):
            parts.insert(0, _rect(x, ty + 0.14, x + lw, 0.65, role=1, essential=False))
    return parts


def _balloon(r):
    rx, ry = r.uniform(0.4, 0.55), r.uniform(0.5, 0.62)
    cy = -0.3
    bottom = cy + ry
    xs = np.linspace(0, 1, 8)
    string = np.stack([0.08 * np.sin(xs * r.uniform(6, 12)), bottom + 0.08 + xs * (0.95 - bottom - 0.08)],
                      axis=1)
    return [_line(string, role=3), _ellipse(0, cy, rx, ry),
            _poly([(0, bottom - 0.02), (-0.07, bottom + 0.08), (0.07, bottom + 0.08)])]


def _bottle(r):
    bw, nw = r.uniform(0.28, 0.4), r.uniform(0.09, 0.14)
    sh = r.uniform(-0.3, -0.1)
    body = _poly([(-bw, 0.95), (-bw, sh), (-nw, sh - 0.3), (-nw, -0.8), (nw, -0.8), (nw, sh - 0.3),
                  (bw, sh), (bw, 0.95)])
    return [body, _rect(-nw - 0.02, -0.95, nw + 0.02, -0.8, role=2),
            _rect(-bw, 0.15, bw, 0.6, role=1, essential=False)]


def _chair(r):
    w, sy = r.uniform(0.42, 0.55), r.uniform(0.0, 0.15)
    back_top = r.uniform(-0.95, -0.75)
    parts = [_rect(-w, back_top, w, back_top + 0.35),
             _line([(-w + 0.05, back_top + 0.35), (-w + 0.05, sy)], role=0),
             _line([(w - 0.05, back_top + 0.35), (w - 0.05, sy)], role=0),
             _poly([(-w, sy), (w, sy), (w + 0.1, sy + 0.15), (-w - 0.1, sy + 0.15)], role=1)]
    for x in (-w - 0.05, w + 0.05):
        parts.append(_line([(x, sy + 0.15), (x, 0.95)], role=0))
    return parts


def _door(r):
    w = r.uniform(0.42, 0.55)
    parts = [_rect(-w, -0.95, w, 0.95)]
    if r.random() < 0.6:
        parts += [_rect(-w + 0.12, -0.8, w - 0.12, -0.15, role=1, essential=False),
                  _rect(-w + 0.12, 0.15, w - 0.12, 0.8, role=1, essential=False)]
    parts.append(_circle(w - 0.15, 0.0, 0.06, role=2))
    return parts


# --- unseen classes: built from the same primitives as seen ones ---
def _mushroom(r):
    R, h = r.uniform(0.75, 0.95), r.uniform(0.5, 0.75)
    cap = np.vstack([_arc_points(0, 0, R, h, 180, 360, n=36), _arc_points(0, 0, R, 0.12, 0, 180, n=12)])
    sw = r.uniform(0.18, 0.28)
    parts = [_poly([(-sw, 0.05), (sw, 0.05), (sw * 1.2, 0.9), (-sw * 1.2, 0.9)], role=1), _poly(cap)]
    for _ in range(int(r.integers(0, 4))):
        parts.append(_circle(r.uniform(-0.5, 0.5) * R, r.uniform(-0.6, -0.2) * h, r.uniform(0.07, 0.12),
                             role=2, essential=False))
    return parts


def _candle(r):
    w, top = r.uniform(0.16, 0.26), r.uniform(-0.4, -0.2)
    parts = [_rect(-w, top, w, 0.9), _line([(0, top), (0, top - 0.12)], role=3),
             _poly(_teardrop(0, top - 0.35, 0.15, 0.45), role=2)]
    if r.random() < 0.5:
        parts.insert(0, _ellipse(0, 0.9, 0.5, 0.1, role=1, essential=False))
    return parts


def _kite(r):
    w, cy = r.uniform(0.45, 0.6), r.uniform(-0.3, -0.15)
    bottom = r.uniform(0.3, 0.45)
    tail_x = np.linspace(0, 1, 10)
    tail = np.stack([0.12 * np.sin(tail_x * 9) + tail_x * 0.25, bottom + tail_x * (0.95 - bottom)], axis=1)
    parts = [_line(tail, role=3, essential=False), _poly([(0, -0.95), (w, cy), (0, bottom), (-w, cy)]),
             _line([(0, -0.95), (0, bottom)], role=3), _line([(-w, cy), (w, cy)], role=3)]
    for k in (3, 6):
        x, y = tail[k]
        parts.append(_poly([(x - 0.1, y - 0.05), (x + 0.1, y + 0.05), (x + 0.1, y - 0.05), (x - 0.1, y + 0.05)],
                           role=2, essential=False))
    return parts


def _envelope(r):
    h = r.uniform(0.45, 0.62)
    tip = r.uniform(-0.05, 0.2)
    parts = [_rect(-0.92, -h, 0.92, h), _poly([(-0.92, -h), (0, tip), (0.92, -h)], role=1)]
    if r.random() < 0.4:
        parts.append(_rect(0.55, 0.1, 0.8, h - 0.1, role=2, essential=False))
    return parts


def _bicycle(r):
    wr = r.uniform(0.3, 0.4)
    parts = [_circle(-0.55, 0.35, wr, filled=False, role=3), _circle(0.55, 0.35, wr, filled=False, role=3)]
    frame = [(-0.55, 0.35), (-0.05, 0.35), (0.3, -0.2), (-0.3, -0.2), (-0.55, 0.35)]
    parts += [_line(frame), _line([(-0.05, 0.35), (-0.35, -0.32)]), _line([(0.3, -0.2), (0.55, 0.35)]),
              _line([(-0.45, -0.35), (-0.22, -0.35)], role=3), _line([(0.3, -0.2), (0.35, -0.45), (0.5, -0.5)],
                                                                      role=3, essential=False)]
    return parts


def _glasses(r):
    lr, ly = r.uniform(0.26, 0.34), r.uniform(-0.05, 0.05)
    parts = []
    round_lens = r.random() < 0.5
    for cx in (-0.48, 0.48):
        if round_lens:
            parts.append(_circle(cx, ly, lr, role=1))
        else:
            parts.append(_rect(cx - lr * 1.1, ly - lr * 0.8, cx + lr * 1.1, ly + lr * 0.8, role=1))
    parts.append(_arc(0, ly, 0.48 - lr * 1.05, 0.12, 180, 360, role=3))
    parts += [_line([(-0.48 - lr, ly - 0.1), (-0.98, ly - 0.25)], role=3, essential=False),
              _line([(0.48 + lr, ly - 0.1), (0.98, ly - 0.25)], role=3, essential=False)]
    return parts


def _tent(r):
    w, apex = r.uniform(0.8, 0.95), r.uniform(-0.9, -0.6)
    dw = r.uniform(0.2, 0.32)
    return [_poly([(-w, 0.7), (0, apex), (w, 0.7)]), _poly([(-dw, 0.7), (0, 0.05), (dw, 0.7)], role=3),
            _line([(-0.98, 0.72), (0.98, 0.72)], role=1, essential=False),
            _line([(0, apex), (0.06, apex - 0.15)], role=3, essential=False)]


def _snowman(r):
    r1, r2, r3 = r.uniform(0.36, 0.45), r.uniform(0.26, 0.32), r.uniform(0.17, 0.22)
    y1 = 0.95 - r1
    y2, y3 = y1 - r1 - r2 * 0.8, y1 - r1 - 1.6 * r2 - r3 * 0.8
    parts = [_line([(-r2, y2), (-0.75, y2 - 0.3)], role=1, essential=False),
             _line([(r2, y2), (0.75, y2 - 0.3)], role=1, essential=False),
             _circle(0, y1, r1), _circle(0, y2, r2), _circle(0, y3, r3),
             _circle(-0.07, y3 - 0.04, 0.03, role=3), _circle(0.07, y3 - 0.04, 0.03, role=3)]
    return parts


_DRAWERS: dict[str, Callable[[np.random.Generator], list[Part]]] = {
    "sun": _sun, "moon": _moon, "star": _star, "house": _house, "tree": _tree, "fish": _fish,
    "cup": _cup, "key": _key, "umbrella": _umbrella, "car": _car, "apple": _apple, "bell": _bell,
    "heart": _heart, "arrow": _arrow, "cloud": _cloud, "flower": _flower, "boat": _boat,
    "ladder": _ladder, "clock": _clock, "hat": _hat, "lamp": _lamp, "table": _table,
    "balloon": _balloon, "bottle": _bottle, "chair": _chair, "door": _door,
    "mushroom": _mushroom, "candle": _candle, "kite": _kite, "envelope": _envelope,
    "bicycle": _bicycle, "glasses": _glasses, "tent": _tent, "snowman": _snowman,
}
CLASSES: tuple[str, ...] = tuple(_DRAWERS)
"""All class names, in a fixed order (the order also seeds each class's images)."""
UNSEEN_CLASSES: tuple[str, ...] = ("mushroom", "candle", "kite", "envelope", "bicycle", "glasses",
                                   "tent", "snowman")
"""The fixed zero-shot split: never seen in training, not even as photo distractors."""
SEEN_CLASSES: tuple[str, ...] = tuple(c for c in CLASSES if c not in UNSEEN_CLASSES)

# Typical colours of the body (role 0) in photos; otherwise colours are random.
_PALETTES: dict[str, list[tuple[int, int, int]]] = {
    "sun": [(250, 200, 40), (255, 150, 30)], "moon": [(240, 230, 170), (200, 200, 205)],
    "star": [(250, 210, 50)], "tree": [(60, 150, 60), (40, 110, 50)], "apple": [(200, 30, 30), (120, 190, 50)],
    "heart": [(220, 30, 60), (240, 110, 160)], "cloud": [(245, 245, 250), (190, 195, 205)],
    "snowman": [(245, 245, 250)], "candle": [(240, 235, 215), (200, 40, 40)], "envelope": [(245, 240, 225)],
    "mushroom": [(200, 40, 30), (170, 120, 80)], "tent": [(230, 120, 30), (60, 120, 70)],
}


def _check_class(class_name: str) -> None:
    if class_name not in _DRAWERS:
        raise SyntheticBenchmarkError(f"unknown synthetic class {class_name!r}; known: {', '.join(CLASSES)}")


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def _pose(rng, S, *, scale, center, max_rot, max_log_aspect):
    """[2, 3] affine map from object coordinates to pixels (random rotation, aspect, mirror)."""
    a = math.radians(rng.uniform(-max_rot, max_rot))
    asp = math.exp(rng.uniform(-max_log_aspect, max_log_aspect))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    k = scale * S / 2
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    lin = rot @ np.diag([flip * k * asp, k / asp])
    return np.hstack([lin, np.asarray(center, dtype=np.float64)[:, None]])


def _apply(m, pts):
    return pts @ m[:, :2].T + m[:, 2]


def _resample(pts: np.ndarray, step: float) -> np.ndarray:
    """Points every ``step`` pixels along the polyline ``pts`` [N, 2]."""
    seg = np.hypot(*np.diff(pts, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(cum[-1] / step) + 1)
    s = np.linspace(0, cum[-1], n)
    return np.stack([np.interp(s, cum, pts[:, 0]), np.interp(s, cum, pts[:, 1])], axis=1)


def _hand_stroke(pts, closed, rng, amp, wave_len):
    """A human-looking stroke along ``pts`` (pixels): smooth wobble, closed loops that overshoot
    or leave a gap, starting anywhere on the loop."""
    if closed:
        pts = np.roll(pts, -int(rng.integers(len(pts))), axis=0)
        pts = np.vstack([pts, pts[:1]])
    dense = _resample(pts, 3.0)
    n = len(dense)
    if closed:
        extra = int(rng.uniform(-0.04, 0.1) * n)
        dense = np.vstack([dense, dense[1:1 + extra]]) if extra > 0 else dense[: n + extra]
        n = len(dense)
    tangent = np.gradient(dense, axis=0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1) / (np.hypot(*tangent.T)[:, None] + 1e-9)
    # wobble: two slow waves whose number of cycles grows with the stroke's length, plus tremble
    cycles = np.linspace(0, 1, n) * max(1.0, n * 3.0 / wave_len)
    disp = (rng.uniform(0.4, 1.0) * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * cycles + rng.uniform(0, 6.3))
            + rng.uniform(0.0, 0.5) * np.sin(2 * np.pi * rng.uniform(1.0, 2.5) * cycles + rng.uniform(0, 6.3)))
    disp = amp * disp + rng.normal(0, 0.1 * amp, n)
    return dense + normal * disp[:, None]


def _render_sketch(parts: list[Part], rng: np.random.Generator, size: int) -> Image.Image:
    S = size * _SUPERSAMPLE
    img = Image.new("L", (S, S), 255)
    draw = ImageDraw.Draw(img)
    m = _pose(rng, S, scale=rng.uniform(0.6, 0.9), center=S / 2 + rng.uniform(-0.07, 0.07, 2) * S,
              max_rot=15, max_log_aspect=0.18)
    width = rng.uniform(1.5, 3.5) * _SUPERSAMPLE  # pixels at the output size
    ink = int(rng.integers(0, 70))
    amp = rng.uniform(0.003, 0.012) * S
    p_missing = rng.uniform(0.0, 0.35)
    drawn = []
    for part in parts:
        if not part.essential and rng.random() < p_missing:
            continue
        # each part placed by hand: slightly shifted and resized
        c = part.points.mean(axis=0)
        pts = (part.points - c) * rng.uniform(0.93, 1.07) + c + rng.normal(0, 0.025, 2)
        stroke = _hand_stroke(_apply(m, pts), part.closed, rng, amp, 0.5 * S)
        draw.line([tuple(p) for p in stroke], fill=ink, width=max(1, round(width * rng.uniform(0.8, 1.2))),
                  joint="curve")
        drawn.append(stroke)
    if rng.random() < 0.25:  # an extra stroke: shading hatch or a ground line
        allpts = np.vstack(drawn)
        (x0, y0), (x1, y1) = allpts.min(0), allpts.max(0)
        if rng.random() < 0.5:
            cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
            for k in range(int(rng.integers(3, 6))):
                o = (k - 2) * 0.04 * S
                seg = np.array([(cx + o - 0.05 * S, cy + 0.05 * S), (cx + o + 0.05 * S, cy - 0.05 * S)])
                draw.line([tuple(p) for p in seg], fill=ink, width=max(1, round(width * 0.7)))
        else:
            ground = np.array([(x0 - 0.05 * S, y1 + 0.02 * S), (x1 + 0.05 * S, y1 + 0.02 * S)])
            stroke = _hand_stroke(ground, False, rng, amp, 0.5 * S)
            draw.line([tuple(p) for p in stroke], fill=ink, width=max(1, round(width)), joint="curve")
    return img.resize((size, size), Image.LANCZOS).convert("RGB")


def _jitter_colour(rng, base) -> np.ndarray:
    c = np.asarray(base, dtype=np.float32) / 255 * rng.uniform(0.85, 1.1) + rng.normal(0, 0.05, 3)
    return np.clip(c, 0, 1).astype(np.float32)


def _random_colour(rng, saturation=(0.4, 1.0), brightness=(0.15, 0.9)) -> np.ndarray:
    grey = rng.uniform(*brightness)
    c = grey + (rng.uniform(0, 1, 3) - grey) * rng.uniform(*saturation)
    return np.clip(c, 0, 1).astype(np.float32)


def _object_colours(rng, class_name) -> list[np.ndarray]:
    """Colours of the four slots: body (the class's typical colour 75% of the time), second part,
    accent, dark detail."""
    palette = _PALETTES.get(class_name)
    body = (_jitter_colour(rng, palette[int(rng.integers(len(palette)))])
            if palette and rng.random() < 0.75 else _random_colour(rng))
    dark = np.clip(rng.uniform(0.0, 0.25) + rng.normal(0, 0.03, 3), 0, 1).astype(np.float32)
    return [body, _random_colour(rng), _random_colour(rng), dark]


def _coords(h, w, x0, y0, S):
    """[h, 1] and [1, w] pixel coordinates of a window at (x0, y0), in units of the canvas size."""
    return (np.arange(y0, y0 + h, dtype=np.float32)[:, None] / S,
            np.arange(x0, x0 + w, dtype=np.float32)[None, :] / S)


def _texture(rng, h, w, x0, y0, colour, S) -> np.ndarray:
    """[h, w, 3] fill for a window whose top-left pixel is (x0, y0): flat, shading gradient,
    stripes, spots or mottled, with grain."""
    yy, xx = _coords(h, w, x0, y0, S)
    kind = rng.choice(5, p=[0.2, 0.35, 0.15, 0.1, 0.2])
    if kind == 1:
        a = rng.uniform(0, 2 * np.pi)
        g = (np.cos(a) * xx + np.sin(a) * yy) * rng.uniform(0.8, 2.0)
        tex = colour * (1 + (g - g.mean())[..., None])
    elif kind == 2:
        a, period = rng.uniform(0, np.pi), rng.uniform(0.04, 0.1)
        on = (np.sin((np.cos(a) * xx + np.sin(a) * yy) * (2 * np.pi / period)) > 0)[..., None]
        tex = np.where(on, colour, _random_colour(rng))
    elif kind == 3:
        spots = (np.sin(xx / 0.03 + rng.uniform(0, 6)) * np.sin(yy / 0.03 + rng.uniform(0, 6)) > 0.55)
        tex = np.where(spots[..., None], _random_colour(rng), colour)
    elif kind == 4:
        tex = colour * (1 + 0.25 * _smooth_noise(rng, h, w, cells=int(rng.integers(3, 7)))[..., None])
    else:
        tex = np.broadcast_to(colour, (h, w, 3))
    grain = rng.uniform(0.0, 0.04)
    return tex + grain * rng.standard_normal((h, w, 3), dtype=np.float32)


def _smooth_noise(rng, h, w, cells) -> np.ndarray:
    """[h, w] low-frequency noise in [-1, 1] (bicubic upsampling of a coarse random grid)."""
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32) / 127.5 - 1


# Photo backgrounds, from easy to hard: "plain" (studio-like, near white), "soft" (light
# gradient or blotches, a few faint shapes), "cluttered" (any muted colours, stripes, many shapes).
_BACKGROUND_STYLES = {"plain": 0.35, "soft": 0.4, "cluttered": 0.25}


def _background(rng, S) -> np.ndarray:
    """[S, S, 3] photo background in one of :data:`_BACKGROUND_STYLES`."""
    style = rng.choice(list(_BACKGROUND_STYLES), p=list(_BACKGROUND_STYLES.values()))
    yy, xx = _coords(S, S, 0, 0, S)
    sat, bright, n_clutter = {"plain": ((0.0, 0.15), (0.85, 1.0), 0), "soft": ((0.05, 0.35), (0.65, 0.95), 4),
                              "cluttered": ((0.05, 0.5), (0.4, 0.95), 10)}[style]
    c0, c1 = _random_colour(rng, sat, bright), _random_colour(rng, sat, bright)
    kind = rng.choice(3, p=[0.5, 0.5, 0.0] if style != "cluttered" else [0.3, 0.4, 0.3])
    if kind == 0:  # gradient
        a = rng.uniform(0, 2 * np.pi)
        g = np.clip(np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5) + 0.5, 0, 1)
    elif kind == 1:  # blotches
        g = _smooth_noise(rng, S, S, cells=int(rng.integers(2, 7))) * 0.5 + 0.5
    else:  # stripes
        a, period = rng.uniform(0, np.pi), rng.uniform(0.05, 0.2)
        g = (np.sin((np.cos(a) * xx + np.sin(a) * yy) * (2 * np.pi / period)) > 0) * rng.uniform(0.3, 1.0)
    bg = c0 * (1 - g[..., None]) + c1 * g[..., None]
    for _ in range(int(rng.integers(0, n_clutter + 1))):  # clutter: faint random shapes
        x, y, r = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(0.03, 0.2) * S
        x0, y0 = int(max(0, x - r)), int(max(0, y - r))
        x1, y1 = int(min(S, x + r + 1)), int(min(S, y + r + 1))
        if x1 <= x0 or y1 <= y0:
            continue
        mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        d = ImageDraw.Draw(mask)
        x, y = x - x0, y - y0
        alpha = int(rng.uniform(0.1, 0.35) * 255)
        shape = rng.integers(3)
        if shape == 0:
            d.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=alpha)
        elif shape == 1:
            d.rectangle([x - r, y - r * 0.5, x + r, y + r * 0.5], fill=alpha)
        else:
            d.line([(x - r, y - r), (x + r, y + r * rng.uniform(-1, 1))], fill=alpha, width=int(r * 0.15) + 1)
        _composite(bg[y0:y1, x0:x1], mask, _random_colour(rng, (0.1, 0.8)))
    return bg


def _composite(window, mask: Image.Image, colour_or_tex) -> None:
    """Paint ``colour_or_tex`` over ``window`` [h, w, 3] (in place) through the 8-bit ``mask``."""
    a = np.asarray(mask, dtype=np.float32)[..., None] * (1 / 255)
    window += a * (colour_or_tex - window)


def _paint_object(canvas, parts, class_name, rng, m, S) -> None:
    """Paint the parts (placed by the affine map ``m``) onto ``canvas`` [S, S, 3] in place."""
    colours = _object_colours(rng, class_name)
    scale = math.hypot(*m[:, 0])  # pixels per object unit
    line_w = max(2, round(rng.uniform(0.05, 0.09) * scale))
    outline_w = max(1, round(rng.uniform(0.025, 0.045) * scale))  # visible edges, like a sketch's
    placed = [_apply(m, part.points) for part in parts]
    allpts = np.vstack(placed)
    x0, y0 = np.floor(allpts.min(0) - line_w).astype(int).clip(0, S)
    x1, y1 = np.ceil(allpts.max(0) + line_w + 1).astype(int).clip(0, S)
    if x1 <= x0 or y1 <= y0:
        return  # entirely off the canvas
    window = canvas[y0:y1, x0:x1]  # a view: painting it paints the canvas
    h, w = window.shape[:2]
    textures: dict[int, np.ndarray] = {}  # one texture per colour slot, shared by its parts
    for part, pts in zip(parts, placed):
        local = [tuple(p) for p in pts - (x0, y0)]
        mask = Image.new("L", (w, h), 0)
        d = ImageDraw.Draw(mask)
        if part.closed and part.filled:
            d.polygon(local, fill=255)
        else:
            d.line(local + local[:1] if part.closed else local, fill=255, width=line_w, joint="curve")
        if part.role not in textures:
            textures[part.role] = _texture(rng, h, w, x0, y0, colours[part.role], S)
        _composite(window, mask, textures[part.role])
        if part.closed and part.filled:
            mask = Image.new("L", (w, h), 0)
            ImageDraw.Draw(mask).line(local + local[:1], fill=255, width=outline_w, joint="curve")
            _composite(window, mask, colours[part.role] * 0.25)


def _render_photo(class_name, rng, size, distractor_classes) -> Image.Image:
    S = size * _SUPERSAMPLE
    canvas = _background(rng, S)
    main_scale = rng.uniform(0.65, 0.85)  # large and central, as in Sketchy photos
    n_distract = 1 + int(rng.random() < 0.45) if distractor_classes else 0
    for corner in rng.permutation(4)[:n_distract]:  # distractors first: the main object may cover them
        name = distractor_classes[int(rng.integers(len(distractor_classes)))]
        sign = np.array([1 if corner % 2 else -1, 1 if corner // 2 else -1])
        centre = S / 2 + sign * rng.uniform(0.28, 0.38, 2) * S
        m = _pose(rng, S, scale=main_scale * rng.uniform(0.3, 0.5), center=centre, max_rot=25,
                  max_log_aspect=0.15)
        _paint_object(canvas, _DRAWERS[name](rng), name, rng, m, S)
    m = _pose(rng, S, scale=main_scale, center=S / 2 + rng.uniform(-0.06, 0.06, 2) * S, max_rot=15,
              max_log_aspect=0.15)
    _paint_object(canvas, _DRAWERS[class_name](rng), class_name, rng, m, S)
    big = Image.fromarray((np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8))
    small = big.resize((size, size), Image.LANCZOS)
    noisy = np.asarray(small, dtype=np.float32) + rng.uniform(0.5, 6) * rng.standard_normal((size, size, 3),
                                                                                            dtype=np.float32)
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def draw_sketch(class_name: str, rng: np.random.Generator | int, size: int = 128) -> Image.Image:
    """A hand-drawn-looking sketch of ``class_name``: RGB, dark strokes on white, ``size`` x ``size``."""
    _check_class(class_name)
    rng = _as_rng(rng)
    return _render_sketch(_DRAWERS[class_name](rng), rng, size)


def draw_photo(class_name: str, rng: np.random.Generator | int, size: int = 128, *,
               distractor_classes: Sequence[str] | None = None) -> Image.Image:
    """A "photo" of ``class_name``: the object filled and textured on a cluttered background, with
    1-2 smaller distractor objects drawn from ``distractor_classes`` (default: the seen classes;
    ``class_name`` itself is always excluded, an empty sequence means no distractors)."""
    _check_class(class_name)
    pool = SEEN_CLASSES if distractor_classes is None else tuple(distractor_classes)
    for name in pool:
        _check_class(name)
    pool = tuple(c for c in pool if c != class_name)
    return _render_photo(class_name, _as_rng(rng), size, pool)


# ----------------------------------------------------------------------------------------------
# Writing the benchmark
# ----------------------------------------------------------------------------------------------
_KIND_CODE = {"sketch": 0, "photo": 1}


def _image_rng(seed: int, class_name: str, kind: str, index: int) -> np.random.Generator:
    """Each image has its own stream, so any subset or count reproduces the same images."""
    key = [seed, CLASSES.index(class_name), _KIND_CODE[kind], index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _benchmark_config(seed, sketches_per_class, photos_per_class, unseen_per_class, size, classes) -> dict:
    return {"name": "puxim-synthetic", "version": SYNTHETIC_VERSION, "seed": seed, "size": size,
            "sketches_per_class": sketches_per_class, "photos_per_class": photos_per_class,
            "unseen_per_class": unseen_per_class, "classes": list(classes)}


def _seen_and_unseen(classes: Sequence[str], counts: dict) -> tuple[list, list]:
    """The seen and unseen classes of ``classes`` in :data:`CLASSES` order; ``counts`` checked positive."""
    for name in classes:
        _check_class(name)
    seen = [c for c in CLASSES if c in classes and c not in UNSEEN_CLASSES]
    unseen = [c for c in CLASSES if c in classes and c in UNSEEN_CLASSES]
    if not seen or not unseen:
        raise SyntheticBenchmarkError(f"need at least one seen and one unseen class, got {list(classes)}")
    for key, val in counts.items():
        if int(val) < 1:
            raise SyntheticBenchmarkError(f"{key} must be positive, got {val}")
    return seen, unseen


def _drawing_jobs(seen: list, unseen: list, sketches_per_class: int, photos_per_class: int,
                  unseen_per_class: int) -> list:
    """Every image to draw: (class, kind, index, relative path, label, split)."""
    jobs = []
    for split, names, n_sketch, n_photo in (("train", seen, sketches_per_class, photos_per_class),
                                            ("zero", unseen, unseen_per_class, unseen_per_class)):
        for label, name in enumerate(names):
            jobs += [(name, "sketch", i, f"{SKETCH_DIR}/{name}/{name}_{i:04d}.png", label, split)
                     for i in range(n_sketch)]
            jobs += [(name, "photo", i, f"{PHOTO_DIR}/{name}/{name}_{i:04d}.jpg", label, split)
                     for i in range(n_photo)]
    return jobs


def _write_split_files(split_dir: Path, seen: list, unseen: list, lists: dict) -> None:
    """The class-id tables and the four file lists, as the released Sketchy split folders have them."""
    split_dir.mkdir(parents=True)
    (split_dir / "cname_cid.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(seen)))
    (split_dir / "cname_cid_zero.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(unseen)))
    for split in ("train", "zero"):
        (split_dir / f"sketch_tx_000000000000_ready_filelist_{split}.txt").write_text(
            "\n".join(lists[("sketch", split)]) + "\n")
        (split_dir / f"all_photo_filelist_{split}.txt").write_text("\n".join(lists[("photo", split)]) + "\n")


def _replace_folder(new: Path, root: Path) -> None:
    """Put the complete folder ``new`` at ``root``, moving an old one aside first (rename cannot replace a
    folder)."""
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.replace(root, old / "x")
        os.replace(new, root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, root)


def make_synthetic_benchmark(root: str | Path, *, seed: int = 0, sketches_per_class: int = 60,
                             photos_per_class: int = 60, unseen_per_class: int = 40, size: int = 128,
                             classes: Sequence[str] | None = None, progress: bool = True) -> Path:
    """Draw the benchmark and write it under ``root`` (see the module docstring for the layout).

    Seen classes get ``sketches_per_class`` sketches and ``photos_per_class`` photos, unseen
    classes ``unseen_per_class`` of each. ``classes`` picks a subset of :data:`CLASSES` (needs at
    least one seen and one unseen class). Everything is written into a temporary sibling folder
    that replaces ``root`` only when complete, so an interrupted run never leaves half a
    benchmark. Returns ``root``.
    """
    from utils.progress import progress_bar

    classes = tuple(CLASSES if classes is None else classes)
    counts = dict(sketches_per_class=sketches_per_class, photos_per_class=photos_per_class,
                  unseen_per_class=unseen_per_class)
    seen, unseen = _seen_and_unseen(classes, {**counts, "size": size})
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        base = tmp / "Sketchy"
        jobs = _drawing_jobs(seen, unseen, **counts)
        for name in seen + unseen:
            (base / SKETCH_DIR / name).mkdir(parents=True)
            (base / PHOTO_DIR / name).mkdir(parents=True)
        lists: dict[tuple[str, str], list[str]] = {}
        # photos' distractors: seen classes only (unseen objects must never appear in training)
        pool = tuple(SEEN_CLASSES)
        for name, kind, i, rel, label, split in progress_bar(jobs, desc="drawing synthetic benchmark",
                                                             enabled=progress, unit="img"):
            rng = _image_rng(seed, name, kind, i)
            if kind == "sketch":
                _render_sketch(_DRAWERS[name](rng), rng, size).save(base / rel, format="PNG")
            else:
                _render_photo(name, rng, size, tuple(c for c in pool if c != name)).save(
                    base / rel, format="JPEG", quality=92)
            lists.setdefault((kind, split), []).append(f"{rel} {label}")
        _write_split_files(base / SPLIT_DIR, seen, unseen, lists)
        stamp = _benchmark_config(seed, sketches_per_class, photos_per_class, unseen_per_class, size,
                                  [c for c in CLASSES if c in classes])
        stamp.update(seen_classes=seen, unseen_classes=unseen,
                     num_images={f"{k}_{s}": len(v) for (k, s), v in sorted(lists.items())})
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
        _replace_folder(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# make_synthetic_benchmark's defaults (counts, size, classes): what a cached benchmark is checked against
_MAKE_DEFAULTS = {k: p.default for k, p in inspect.signature(make_synthetic_benchmark).parameters.items()
                  if p.kind is p.KEYWORD_ONLY and k not in ("seed", "progress")}


def default_cache_dir() -> Path:
    """``$PUXIM_CACHE`` if set, else ``~/.cache/puxim``."""
    env = os.environ.get("PUXIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "puxim"


def _read_stamp(root: Path) -> dict | None:
    try:
        return json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def ensure_synthetic_benchmark(cache_dir: str | Path | None = None, *, seed: int = 0, **kw) -> Path:
    """Return the root of the synthetic benchmark for ``seed`` under ``cache_dir``
    (default :func:`default_cache_dir`), drawing it on first use.

    The root is ``<cache_dir>/synthetic-seed<seed>``. An existing one is reused when its stamp matches
    the version, seed, size, counts and classes asked for (``kw`` as for
    :func:`make_synthetic_benchmark`); otherwise it is drawn again. In multi-process training call
    this on one process first, then on the others.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache_dir / f"synthetic-seed{seed}"
    unknown = set(kw) - set(_MAKE_DEFAULTS) - {"progress"}
    if unknown:
        raise TypeError(f"ensure_synthetic_benchmark() got unexpected arguments {sorted(unknown)}")
    opts = {**_MAKE_DEFAULTS, **{k: v for k, v in kw.items() if k in _MAKE_DEFAULTS}}
    classes = tuple(CLASSES if opts["classes"] is None else opts["classes"])
    wanted = _benchmark_config(seed, opts["sketches_per_class"], opts["photos_per_class"],
                               opts["unseen_per_class"], opts["size"], [c for c in CLASSES if c in classes])
    stamp = _read_stamp(root)
    complete = (root / "Sketchy" / SPLIT_DIR / "cname_cid_zero.txt").is_file()
    if isinstance(stamp, dict) and complete and all(stamp.get(k) == v for k, v in wanted.items()):
        log.info("Using the synthetic benchmark in %s (version %d, seed %d)", root, SYNTHETIC_VERSION, seed)
        return root
    if not isinstance(stamp, dict):
        log.info("Drawing the synthetic benchmark (version %d, seed %d) into %s", SYNTHETIC_VERSION, seed, root)
    else:
        changed = sorted(k for k, v in wanted.items() if stamp.get(k) != v)
        log.info("Redrawing the synthetic benchmark in %s: %s changed", root, ", ".join(changed))
    return make_synthetic_benchmark(root, seed=seed, **opts, progress=kw.get("progress", True))


# ----------------------------------------------------------------------------------------------
# Command line: generate, and optionally save a preview grid
# ----------------------------------------------------------------------------------------------
def save_preview(root: str | Path, path: str | Path, *, per_class: int = 3, tile: int = 96) -> Path:
    """A grid image: one row per class with its name, ``per_class`` sketches then photos."""
    from PIL import ImageFont

    root, path = Path(root), Path(path)
    stamp = _read_stamp(root)
    if stamp is None:
        raise SyntheticBenchmarkError(f"{root / STAMP_NAME} is missing: not a synthetic benchmark root")
    names = stamp["seen_classes"] + stamp["unseen_classes"]
    label_w, pad = 175, 4
    grid = Image.new("RGB", (label_w + 2 * per_class * (tile + pad), len(names) * (tile + pad)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=16)
    for row, name in enumerate(names):
        y = row * (tile + pad)
        title = name + (" (unseen)" if name in stamp["unseen_classes"] else "")
        draw.text((4, y + tile // 2 - 10), title, fill="black", font=font)
        for k in range(per_class):
            for j, (folder, ext) in enumerate(((SKETCH_DIR, "png"), (PHOTO_DIR, "jpg"))):
                f = root / "Sketchy" / folder / name / f"{name}_{k:04d}.{ext}"
                if f.is_file():
                    x = label_w + (j * per_class + k) * (tile + pad)
                    grid.paste(Image.open(f).convert("RGB").resize((tile, tile), Image.BILINEAR), (x, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="benchmark root to write (ROOT/Sketchy/...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sketches_per_class", type=int, default=60)
    parser.add_argument("--photos_per_class", type=int, default=60)
    parser.add_argument("--unseen_per_class", type=int, default=40)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--preview", default=None, help="also save a preview grid image (PNG) here")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = make_synthetic_benchmark(args.out, seed=args.seed, sketches_per_class=args.sketches_per_class,
                                    photos_per_class=args.photos_per_class,
                                    unseen_per_class=args.unseen_per_class, size=args.size)
    log.info("Wrote the synthetic benchmark to %s", root)
    if args.preview:
        log.info("Wrote a preview to %s", save_preview(root, args.preview))


if __name__ == "__main__":
    main()
