"""datasets.transforms: image loading, mode conversion and the reference preprocessing."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import png_claiming
from datasets.filelist import DatasetError
from datasets.transforms import (
    ENCODER_MEAN, ENCODER_STD, ImageLoadError, ink_bbox, load_image, preprocess_photo,
    preprocess_sketch, to_rgb,
)


def reference_sketch(rgb: np.ndarray, size: int) -> np.ndarray:
    """The REFERENCE rule written out plainly with numpy (resize: the same PIL call)."""
    height, width = rgb.shape[:2]
    total = rgb.astype(np.int64).sum(axis=2)
    ys, xs = np.nonzero(total <= 300)
    if len(ys):
        # released code: img[max(0, ymin - 10):min(h, ymax + 10), ...] (stop exclusive)
        crop = rgb[max(0, ys.min() - 10):min(height, ys.max() + 10),
                   max(0, xs.min() - 10):min(width, xs.max() + 10)]
    else:
        crop = rgb
    h, w = crop.shape[:2]
    if h > w:
        new_w, new_h = int(size / (h / w)), size
    else:
        new_w, new_h = size, int(size * (h / w))
    resized = np.asarray(Image.fromarray(crop).resize((new_w, new_h), Image.BILINEAR))
    canvas = np.full((size, size, 3), 255, np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    return ((canvas.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def blank(h, w, value=255):
    return np.full((h, w, 3), value, np.uint8)


def sketch_cases():
    a = blank(50, 100)
    a[20:30, 30:60] = 0  # landscape ink block
    b = blank(120, 45)
    b[5:110, 10:13] = 30  # tall thin stroke
    b[60, 10:40] = (0, 0, 255)  # a blue line is ink too (0 + 0 + 255 <= 300)
    c = blank(64, 64)
    c[0, :] = 0  # ink touching the top border ...
    c[:, 63] = 0  # ... and the right border: the margin is clipped
    c[40, 5] = (100, 100, 100)  # sum 300: ink
    d = blank(60, 40, 200)  # no ink at all (sum 600): the whole image is used
    d[10:20, 10:20] = 120  # sum 360: still not ink
    e = blank(33, 77)
    rng = np.random.default_rng(0)
    e[8:25, 20:60] = rng.integers(0, 256, (17, 40, 3))  # noisy patch, partly ink
    return {"landscape": a, "portrait": b, "border": c, "no_ink": d, "noisy": e,
            "white": blank(30, 50)}


@pytest.mark.parametrize("name", list(sketch_cases()))
@pytest.mark.parametrize("size", [224, 37])
def test_sketch_matches_numpy_reference(name, size):
    rgb = sketch_cases()[name]
    out = preprocess_sketch(Image.fromarray(rgb), size)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), reference_sketch(rgb, size), atol=1e-6)


def test_sketch_hand_worked_geometry():
    # Ink rows 20..29, cols 30..59 of a 50x100 image: crop rows [10, 39), cols [20, 69)
    # -> 29 x 49; landscape, so 224 wide and int(224 * 29 / 49) = 132 high; pad 46 top, 46 bottom.
    rgb = sketch_cases()["landscape"]
    assert ink_bbox(rgb) == (20, 29, 30, 59)
    out = preprocess_sketch(Image.fromarray(rgb), 224)
    rows_with_non_white = np.flatnonzero((out < 1.0).any(dim=0).any(dim=1).numpy())
    assert rows_with_non_white.min() >= 46 and rows_with_non_white.max() <= 46 + 132 - 1
    # The ink block fills 10/29 of the crop's height starting 10/29 down: rows ~46+45..46+91.
    assert out[:, 46 + 60, 112].max() == -1.0  # centre of the ink block is black
    assert torch.all(out[:, :46] == 1.0) and torch.all(out[:, 46 + 132:] == 1.0)
    # Portrait: crop of the tall stroke is 115 x 39 -> 224 high, int(224 / (115 / 39)) = 75
    # wide; pad (224 - 75) // 2 = 74 left and 75 right (extra pixel on the right).
    out = preprocess_sketch(Image.fromarray(sketch_cases()["portrait"]), 224)
    cols = np.flatnonzero((out < 1.0).any(dim=0).any(dim=0).numpy())
    assert cols.min() >= 74 and cols.max() <= 74 + 75 - 1
    assert torch.all(out[:, :, :74] == 1.0) and torch.all(out[:, :, 74 + 75:] == 1.0)


def test_ink_threshold_boundary():
    rgb = blank(20, 20)
    rgb[3, 4] = (100, 100, 100)  # sum 300 -> ink
    rgb[15, 16] = (100, 100, 101)  # sum 301 -> not ink
    assert ink_bbox(rgb) == (3, 3, 4, 4)
    assert ink_bbox(blank(5, 5, 101)) is None


def test_blank_sketch_is_whole_white_image():
    out = preprocess_sketch(Image.new("RGB", (31, 17), "white"), 224)
    assert torch.all(out == 1.0)


def test_photo_values():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    out = preprocess_photo(Image.fromarray(arr), 32)
    expected = np.asarray(Image.fromarray(arr).resize((32, 32), Image.BILINEAR), np.float32)
    expected = ((expected / 255.0 - np.array(ENCODER_MEAN)) / np.array(ENCODER_STD)).transpose(2, 0, 1)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    # A flat colour stays flat and maps to (v / 255 - 0.5) / 0.5 exactly.
    flat = preprocess_photo(Image.new("RGB", (50, 20), (0, 51, 255)), 224)
    assert flat.shape == (3, 224, 224)
    for channel, v in enumerate((0, 51, 255)):
        assert torch.allclose(flat[channel], torch.tensor((v / 255 - 0.5) / 0.5), atol=1e-6)


# --------------------------------------------------------------------- modes and files

def ink_sketch_l() -> np.ndarray:
    a = np.full((24, 32), 255, np.uint8)
    a[6:10, 4:28] = 0
    a[10:20, 14:17] = 0
    return a


def odd_mode_images():
    """(name, image, file suffix) for each PIL mode, all showing the same black-on-white sketch."""
    grey = ink_sketch_l()
    ink = grey == 0
    L = Image.fromarray(grey, "L")
    rgba = np.zeros((*grey.shape, 4), np.uint8)  # transparent *black* background
    rgba[ink] = (0, 0, 0, 255)
    alpha = Image.fromarray(np.where(ink, 255, 0).astype(np.uint8), "L")
    la = Image.merge("LA", (Image.new("L", L.size, 0), alpha))  # transparent black background
    p_trans = L.convert("P")
    p_trans.info["transparency"] = int(np.asarray(p_trans)[0, 0])  # background index transparent
    i16 = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit: white = 65535
    assert i16.mode == "I;16"
    return [
        ("L", L, ".png"),
        ("P", L.convert("P"), ".png"),
        ("P+transparency", p_trans, ".png"),
        ("RGBA", Image.fromarray(rgba, "RGBA"), ".png"),
        ("LA", la, ".png"),
        ("CMYK", L.convert("RGB").convert("CMYK"), ".tif"),
        ("I;16", i16, ".png"),
        ("I", L.convert("I"), ".tif"),
        ("I (16-bit values)", Image.fromarray(grey.astype(np.int32) * 257), ".tif"),
        ("F", L.convert("F"), ".tif"),
        ("F [0,1]", Image.fromarray(grey.astype(np.float32) / 255.0), ".tif"),
        ("1", L.convert("1"), ".png"),
    ]


@pytest.mark.parametrize("name,image,suffix", odd_mode_images(), ids=[c[0] for c in odd_mode_images()])
def test_every_mode_becomes_black_ink_on_white(tmp_path, name, image, suffix):
    expected = np.repeat(ink_sketch_l()[..., None], 3, axis=2)
    assert np.array_equal(np.asarray(to_rgb(image)), expected), name
    path = tmp_path / f"sketch{suffix}"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), expected), name
    reference = preprocess_sketch(Image.fromarray(expected), 48)
    assert torch.equal(preprocess_sketch(image, 48), reference), name


def test_transparent_background_is_white_not_black():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[4:6, 2:8] = (0, 0, 0, 255)
    img = Image.fromarray(rgba, "RGBA")
    assert np.asarray(img.convert("RGB"))[0, 0].tolist() == [0, 0, 0]  # the naive conversion
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [255, 255, 255]
    half = np.zeros((1, 1, 4), np.uint8)
    half[0, 0] = (0, 0, 0, 128)  # 50% black over white
    assert np.asarray(to_rgb(Image.fromarray(half, "RGBA")))[0, 0].tolist() == [127, 127, 127]


def _png_bytes(tmp_path, size=(64, 64)):
    rng = np.random.default_rng(0)
    path = tmp_path / "good.png"
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


@pytest.mark.parametrize("case", ["corrupt", "zero_byte", "truncated", "missing", "bomb"])
def test_load_image_errors_name_the_path(tmp_path, monkeypatch, case):
    data = _png_bytes(tmp_path)
    path = tmp_path / f"dir with space/{case} ü.png"
    path.parent.mkdir()
    if case == "corrupt":
        path.write_bytes(b"this is not an image" * 10)
    elif case == "zero_byte":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif case == "bomb":
        path.write_bytes(data)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)  # > 2x the limit: error
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert isinstance(info.value, DatasetError)
    assert str(path) in str(info.value)
    if case == "zero_byte":
        assert "zero-byte" in str(info.value)
    if case == "bomb":
        assert "bomb" in str(info.value)


def test_load_image_is_independent_of_the_file(tmp_path):
    _png_bytes(tmp_path)
    img = load_image(tmp_path / "good.png")
    (tmp_path / "good.png").unlink()
    assert img.mode == "RGB" and np.asarray(img).shape == (64, 64, 3)


def test_bomb_warning_zone_is_refused_before_decoding(tmp_path):
    """Between Pillow's warning (~89 MP) and error (~179 MP) limits it only warned and decoded (GBs of RAM)."""
    path = tmp_path / "big.png"
    path.write_bytes(png_claiming(10000, 10000))  # 100 MP: Pillow warns, does not refuse
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError, match=r"big\.png: refused as a possible decompression bomb.*downscale"):
        load_image(path)


@pytest.mark.parametrize("size,ok", [((1, 1), False), ((7, 300), False), ((8, 8), True)])
def test_tiny_images_are_refused_by_name(tmp_path, size, ok):
    path = tmp_path / "icon.png"
    Image.new("RGB", size, (0, 0, 0)).save(path)
    if ok:
        assert load_image(path).size == size
        return
    with pytest.raises(ImageLoadError, match=rf"icon\.png: the image is {size[0]}x{size[1]} pixels, too small"):
        load_image(path)


def test_folder_symlink_loop_and_unreadable_file_get_their_own_reason(tmp_path):
    import os

    folder = tmp_path / "photo.jpg"
    folder.mkdir()
    with pytest.raises(ImageLoadError, match=r"photo\.jpg: is a folder, not an image file"):
        load_image(folder)
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    with pytest.raises(ImageLoadError, match=r"loop\.png: a symbolic link that loops"):
        load_image(loop)


def test_photo_edges_draw_the_outline_and_not_the_frame_or_the_noise():
    from datasets.transforms import photo_edges, preprocess_pseudo_sketch

    rng = np.random.default_rng(0)
    photo = np.full((40, 40, 3), (200, 180, 60), np.uint8)  # a flat background...
    photo[10:30, 12:28] = (20, 40, 160)  # ...with a dark rectangle
    noisy = np.clip(photo + rng.integers(-12, 13, photo.shape), 0, 255).astype(np.uint8)  # pixel noise
    edges = np.asarray(photo_edges(Image.fromarray(noisy), 20).convert("L"))  # [40, 40]: twice the size 20
    assert edges.shape == (40, 40) and set(np.unique(edges)) <= {0, 255}
    ink = edges == 0
    # the rectangle's border (rows 10 and 29, columns 12 and 27 at this scale) is drawn...
    assert ink[8:13, 14:26].any(axis=0).all() and ink[27:32, 14:26].any(axis=0).all()
    assert ink[12:28, 10:15].any(axis=1).all() and ink[12:28, 25:30].any(axis=1).all()
    # ...the photo's frame is not; the noise leaves only isolated specks (Canny's smoothing takes most of it)
    assert not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any())
    outside = np.ones_like(ink)
    outside[8:32, 10:30] = False
    assert ink[outside].mean() < 0.01 and ink[13:27, 15:25].mean() < 0.03
    flat = preprocess_pseudo_sketch(Image.fromarray(np.full((30, 50, 3), 90, np.uint8)), 16)
    assert flat.shape == (3, 16, 16) and torch.all(flat == 1.0)  # no outline: a blank (white) sketch
    sketch = preprocess_pseudo_sketch(Image.fromarray(noisy), 16)
    assert sketch.shape == (3, 16, 16) and (sketch < 0).any()  # ink, cropped and padded as a sketch


def test_photo_edges_draw_a_low_contrast_photo_as_a_high_contrast_one():
    from datasets.transforms import photo_edges

    rng = np.random.default_rng(1)
    mask = np.zeros((48, 48), bool)
    mask[12:36, 10:30] = True  # a rectangle...
    mask[20:30, 30:40] = True  # ...with a tab on its right
    noise = rng.normal(0, 1, (48, 48, 1))

    def photo(contrast):  # grey 120 background, the shape `contrast` levels brighter, noise 1/8 of the contrast
        img = 120 + contrast * (mask[..., None] + noise / 8)
        return Image.fromarray(np.clip(img.repeat(3, axis=2), 0, 255).astype(np.uint8))

    faint, strong = (np.asarray(photo_edges(photo(c), 24).convert("L")) == 0 for c in (12, 96))
    # The thresholds follow the photo's own gradients: 12 grey levels give the strokes 96 levels give...
    assert faint.sum() > 0 and (faint & strong).sum() >= 0.9 * max(faint.sum(), strong.sum())
    # ...and they trace the shape's border, not its inside or the background.
    border = mask ^ np.pad(mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:], 1)
    near = np.zeros_like(border)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            near |= np.roll(np.roll(border, dy, 0), dx, 1)
    assert near[faint].mean() > 0.9 and faint[border].mean() > 0.6  # most of the border is drawn


def test_random_crop_flip_keeps_60_to_100_percent_of_the_area_and_flips_half_the_time():
    from datasets.transforms import CROP_MIN_AREA, random_crop_flip

    size = 64
    columns = torch.arange(size, dtype=torch.float32).expand(3, size, size)  # value = column index
    flips, spans = 0, []
    for seed in range(200):
        out = random_crop_flip(columns, np.random.default_rng(seed))
        assert out.shape == (3, size, size)
        assert torch.equal(out[:, :1].expand_as(out), out)  # every row the same: no vertical mixing of columns
        row = out[0, 0]
        steps = row[1:] - row[:-1]
        assert (steps >= -1e-4).all() or (steps <= 1e-4).all()  # a crop keeps the order, a flip reverses it
        flips += bool(steps.sum() < 0)
        spans.append(float(row.max() - row.min()))  # ≈ the crop's side - 1 (resized to size)
    assert 70 <= flips <= 130
    side_min = size * CROP_MIN_AREA ** 0.5
    assert min(spans) >= side_min - 2 and max(spans) <= size - 1 + 1e-4
    assert min(spans) < side_min + 4 and max(spans) > size - 4  # the whole range of crops is drawn
    same = random_crop_flip(columns, np.random.default_rng(5)), random_crop_flip(columns, np.random.default_rng(5))
    assert torch.equal(*same)  # the draw is the generator's


def test_random_crop_flip_of_the_whole_image_is_the_image_or_its_mirror():
    from datasets.transforms import random_crop_flip

    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    outs = [random_crop_flip(image, np.random.default_rng(seed), min_area=1.0) for seed in range(20)]
    assert all(torch.equal(o, image) or torch.equal(o, image.flip(-1)) for o in outs)
    assert any(torch.equal(o, image) for o in outs) and any(torch.equal(o, image.flip(-1)) for o in outs)


def test_scikit_image_is_imported_only_where_pseudo_sketches_are_drawn():
    """Importing the packages (the paper's path) leaves scikit-image out; drawing a pseudo-sketch brings it in."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    check = ("import sys, datasets, datasets.transforms, datasets.sampling, models, losses\n"
             "assert 'skimage' not in sys.modules, 'imported scikit-image'\n"
             "from PIL import Image\n"
             "datasets.transforms.photo_edges(Image.new('RGB', (8, 8)), 8)\n"
             "assert 'skimage' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", check], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
