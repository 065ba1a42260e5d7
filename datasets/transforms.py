"""Image loading and the reference preprocessing (shared/REFERENCE.md, "Preprocessing").

Sketch (follows the released code's ``remove_white_space_image`` / ``resize_image_by_ratio``
/ ``make_img_square``, on PIL instead of OpenCV):

1. RGB. "Ink" is every pixel with R + G + B <= 300.
2. Crop to the ink bounding box widened by a 10-pixel margin and clipped to the image.
   As in the released code the crop is ``rows [max(0, y0 - 10), min(H, y1 + 10))`` (and the
   same for columns), where y0/y1 are the first/last ink rows; the stop index is exclusive,
   so the margin is 10 px before the first ink pixel and 9 px after the last one.
   A sketch without ink is used whole (the released code crashes on ``np.min([])``).
3. Resize, keeping the aspect ratio, so that the longer side is ``size``; the shorter side
   is ``int(size * short / long)`` (truncated, as the released code computes it), at least 1.
4. Pad to ``size x size`` with white, centred: ``(size - w) // 2`` columns on the left, the
   rest (one more when odd) on the right; likewise top/bottom. (The released code pads with
   the image's maximum value, which is white for any sketch with a white pixel.)

Photo: resize to ``size x size`` (aspect not kept).

Both: to [0, 1], then ``(x - 0.5) / 0.5`` per channel (``ENCODER_MEAN``/``ENCODER_STD``).

Resampling: bilinear (``RESAMPLE``) for both sketches and photos. PIL's bilinear filter
widens its support when downscaling (antialiasing); the released code used OpenCV's
``INTER_LINEAR`` (no antialiasing) for sketches and Pillow's default filter (bicubic for
RGB) for photos, so pixel values differ slightly from the released pipeline's.
No augmentation, as in the reference; the tiny preset's ``--augment crop_flip`` (:func:`random_crop_flip`)
is applied to training triplets only, after this preprocessing.

Image modes: every PIL mode is converted to RGB by :func:`to_rgb`; transparent pixels are
composited onto **white** (a transparent-background sketch must not become black ink), and
``I;16*`` images are read as 16-bit intensities (0..65535 → 0..255), ``I`` (32-bit) images as
16-bit when any value exceeds 255 and as 0..255 otherwise, float images (``F``) as [0, 1] when
all values lie in [0, 1] and as 0..255 otherwise (clipped). Colour profiles are not applied
(CMYK uses Pillow's plain conversion); EXIF orientation is not applied (as in the released code).
"""
from __future__ import annotations

import errno
import math
import os
import warnings

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter

from utils.normalization import ENCODER_MEAN, ENCODER_STD

from .filelist import DatasetError

__all__ = [
    "ENCODER_MEAN", "ENCODER_STD", "INK_THRESHOLD", "CROP_MARGIN", "RESAMPLE",
    "ImageLoadError", "load_image", "to_rgb", "ink_bbox", "crop_sketch",
    "resize_keep_ratio", "pad_to_square", "preprocess_sketch", "preprocess_photo", "to_tensor",
    "photo_edges", "preprocess_pseudo_sketch", "CROP_MIN_AREA", "random_crop_flip",
]

INK_THRESHOLD = 300  # a pixel is ink when R + G + B <= 300
CROP_MARGIN = 10  # pixels kept around the ink bounding box
RESAMPLE = Image.Resampling.BILINEAR  # one filter for sketches and photos
WHITE = (255, 255, 255)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageLoadError(DatasetError):
    """An image file could not be opened or decoded; the message names the path."""


# Smaller than this on either side, an image cannot show a sketch or a photo: a placeholder or a
# broken export, refused rather than blown up to 224 x 224 of one colour.
MIN_IMAGE_SIDE = 8


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and convert an image to RGB (transparency onto white).

    Pillow's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) stays active, and its warning
    zone (over ~89 M pixels) is refused too, before the image is decoded. Any failure — missing,
    zero-byte, corrupt or truncated file, a folder or a link loop, an image under
    ``MIN_IMAGE_SIDE`` pixels, a bomb — raises :class:`ImageLoadError` naming the path.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if min(img.size) < MIN_IMAGE_SIDE:
                    raise ImageLoadError(
                        f"{path}: the image is {img.size[0]}x{img.size[1]} pixels, too small to show a sketch "
                        f"or a photo (at least {MIN_IMAGE_SIDE} px a side); replace it or remove it from the list.")
                img.load()  # decode now, so truncation is found here and not later
                return to_rgb(img)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(
            f"{path}: image file not found; re-check the dataset (python -m datasets.prepare "
            f"--check ...)."
        ) from None
    except IsADirectoryError:
        raise ImageLoadError(f"{path}: is a folder, not an image file; fix the list or the folder layout.") from None
    except PermissionError:
        raise ImageLoadError(f"{path}: permission denied; make the file readable (chmod) or remove it from "
                             f"the list.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(
            f"{path}: refused as a possible decompression bomb ({err}); downscale the image (the model "
            f"sees a few hundred pixels a side), remove it, or raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine."
        ) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageLoadError(f"{path}: a symbolic link that loops (it points back to itself); fix or "
                                 f"remove the link.") from None
        raise _unreadable(path, err) from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
        raise _unreadable(path, err) from None


def _unreadable(path, err: Exception) -> ImageLoadError:
    size = _file_size(path)
    detail = "zero-byte file" if size == 0 else f"{type(err).__name__}: {err}"
    return ImageLoadError(
        f"{path}: cannot read the image ({detail}); the file is corrupt or truncated — "
        f"replace it or remove it from the list."
    )


def _file_size(path) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Return a new RGB image for any PIL mode; transparent pixels become ``background``."""
    mode = img.mode
    if mode in _INT_MODES:
        # I;16*: 16-bit intensities (Pillow decodes 16-bit greyscale PNG/TIFF so). "I" (32-bit)
        # is ambiguous: 16-bit data when any value exceeds 255, else already 0..255.
        arr = np.asarray(img).astype(np.float64)
        if mode != "I" or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        mode = "L"
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        arr = np.nan_to_num(arr * scale, nan=0.0, posinf=255.0, neginf=0.0)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        mode = "L"
    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    if has_alpha:
        with warnings.catch_warnings():  # "Palette images with Transparency ... RGBA"
            warnings.simplefilter("ignore", UserWarning)
            rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode == "RGB":
        return img.copy()  # a new image, independent of the (closed) file
    return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → float tensor ``[3, H, W]`` normalised with ``ENCODER_MEAN/STD``."""
    arr = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3] in [0, 1]
    mean = np.asarray(ENCODER_MEAN, dtype=np.float32)
    std = np.asarray(ENCODER_STD, dtype=np.float32)
    arr = (arr - mean) / std
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # [3, H, W]


def ink_bbox(rgb: np.ndarray, threshold: int = INK_THRESHOLD) -> tuple[int, int, int, int] | None:
    """``(top, bottom, left, right)`` of the ink pixels (inclusive), or None without ink."""
    ink = rgb.astype(np.int32).sum(axis=2) <= threshold  # [H, W]
    rows = np.flatnonzero(ink.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(ink.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def crop_sketch(img: Image.Image, margin: int = CROP_MARGIN) -> Image.Image:
    """Crop an RGB sketch to its ink bounding box plus margin (see module doc)."""
    box = ink_bbox(np.asarray(img))
    if box is None:
        return img  # no ink: keep the whole image
    top, bottom, left, right = box
    w, h = img.size
    return img.crop((max(0, left - margin), max(0, top - margin),
                     min(w, right + margin), min(h, bottom + margin)))


def resize_keep_ratio(img: Image.Image, size: int, resample=RESAMPLE) -> Image.Image:
    """Resize so the longer side is ``size``; the shorter is truncated as in the released code."""
    w, h = img.size
    ratio = h / w
    if h > w:
        new_w, new_h = int(size / ratio), size
    else:
        new_w, new_h = size, int(size * ratio)
    return img.resize((max(1, new_w), max(1, new_h)), resample)


def pad_to_square(img: Image.Image, size: int, fill=WHITE) -> Image.Image:
    """Centre ``img`` on a ``size x size`` canvas; an odd remainder goes right/bottom."""
    w, h = img.size
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(img, ((size - w) // 2, (size - h) // 2))
    return canvas


def preprocess_sketch(img: Image.Image, size: int = 224) -> torch.Tensor:
    """Sketch → ``[3, size, size]``: crop to ink (+margin), keep-ratio resize, pad white, normalise."""
    rgb = to_rgb(img)
    out = pad_to_square(resize_keep_ratio(crop_sketch(rgb), size), size)
    return to_tensor(out)  # [3, size, size]


def preprocess_photo(img: Image.Image, size: int = 224) -> torch.Tensor:
    """Photo → ``[3, size, size]``: plain resize (aspect not kept), normalise."""
    rgb = to_rgb(img)
    return to_tensor(rgb.resize((size, size), RESAMPLE))  # [3, size, size]


# photo_edges' Canny (skimage.feature.canny at twice the input side): the Gaussian's sigma in pixels of that
# grid, and the hysteresis thresholds as quantiles of the photo's own gradient magnitudes.
EDGE_SIGMA = 2.0
EDGE_QUANTILES = (0.8, 0.95)  # (low, high): weak edges kept where they join the strongest 5% of the gradient


def photo_edges(img: Image.Image, size: int) -> Image.Image:
    """A photo's outlines drawn as a sketch: black strokes on white, ``2 size x 2 size`` (RGB).

    Canny (``skimage.feature.canny``) on the grey photo at twice the model's input side (thin outlines
    survive the later downscale). The thresholds are quantiles of the photo's own gradient magnitudes, not
    fixed levels: one fixed level draws next to nothing of a low-contrast photo and the pixel noise of a
    noisy one. The Gaussian smoothing keeps noise from making strokes, and Canny leaves the photo's frame
    undrawn (it takes no edge from the border pixels); the one-pixel lines are then widened to three. A photo
    without any edge (one flat colour) gives a blank sketch.
    """
    from skimage.feature import canny  # here: only the pseudo-sketches need scikit-image, slow to import

    side = 2 * size
    gray = np.asarray(to_rgb(img).convert("L").resize((side, side), RESAMPLE), np.float32) / 255.0  # [2S, 2S]
    if np.ptp(gray) == 0:  # flat: no gradient to take quantiles of
        return Image.new("RGB", (side, side), WHITE)
    low, high = EDGE_QUANTILES
    edges = canny(gray, sigma=EDGE_SIGMA, low_threshold=low, high_threshold=high, use_quantiles=True)  # [2S, 2S]
    strokes = Image.fromarray(np.where(edges, 0, 255).astype(np.uint8))
    # Canny's lines are one pixel wide: widened to three, they stay dark (about 1.5 pixels) at the input side.
    return strokes.filter(ImageFilter.MinFilter(3)).convert("RGB")


def preprocess_pseudo_sketch(img: Image.Image, size: int = 224) -> torch.Tensor:
    """Photo → its pseudo-sketch ``[3, size, size]``: :func:`photo_edges`, then the sketch preprocessing."""
    return preprocess_sketch(photo_edges(img, size), size)


CROP_MIN_AREA = 0.6  # random_crop_flip keeps at least this fraction of the image's area


def random_crop_flip(image: torch.Tensor, rng: np.random.Generator, *,
                     min_area: float = CROP_MIN_AREA) -> torch.Tensor:
    """A preprocessed image ``[C, S, S]`` seen slightly differently: a random square crop of ``min_area`` to all
    of its area, resized back to ``S x S`` (bilinear, antialiased), mirrored left-right half the time.

    The draws come from ``rng`` (the triplet's own generator: the same for any worker count). Squares, not
    other aspect ratios, and no rotation: a rotated square is another benchmark's diamond.
    """
    size = image.shape[-1]
    side = max(1, min(size, int(round(size * math.sqrt(rng.uniform(min_area, 1.0))))))
    top, left = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
    if side < size:
        image = TF.resized_crop(image, top, left, side, side, [size, size], antialias=True)  # [C, S, S]
    return TF.horizontal_flip(image) if rng.random() < 0.5 else image
