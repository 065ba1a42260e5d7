"""utils.visualize (mask figure, retrieval grid, ranking, TensorBoard summaries) and tools.visualize_masks."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.transforms import preprocess_photo, to_tensor
from utils import visualize as vis
from conftest import tiny_config  # tests/ is on sys.path

SIZE = 64  # the tiny preset's input size (8 x 8 patches of 8 pixels)
N_PATCHES = 64


# ----------------------------------------------------------------------------- helpers
def _random_images(n, h, w, seed, lo=50, hi=200):
    """Random uint8 images, channels in [lo, hi]: by default never GREEN, RED or BLUE (each has a 0)."""
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi + 1, size=(n, h, w, 3), dtype=np.uint8)


def _patch_is_fill(panel: np.ndarray, g: int) -> np.ndarray:
    """[g, g] bool: patch entirely MASK_FILL."""
    p = panel.shape[0] // g
    blocks = panel.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4)  # [g, g, p, p, 3]
    return (blocks == np.array(vis.MASK_FILL, np.uint8)).all(axis=(2, 3, 4))


def _kept_panel(fig, index, hw, grid):
    top, left = vis.mask_panel_origin(index, 2, hw, grid)
    return fig[top:top + hw[0], left:left + hw[1]]


def _frame_colour(img, i, tile):
    """The colour of tile i's frame if the whole ring has one colour, else None."""
    top, left = vis.retrieval_tile_origin(i, tile)
    framed = tile + 2 * vis.BORDER
    box = img[top:top + framed, left:left + framed]
    ring = np.ones((framed, framed), bool)
    ring[vis.BORDER:-vis.BORDER, vis.BORDER:-vis.BORDER] = False
    colours = np.unique(box[ring].reshape(-1, 3), axis=0)
    return tuple(int(c) for c in colours[0]) if len(colours) == 1 else None


def _count_colour(img, colour):
    return int((img == np.array(colour, np.uint8)).all(axis=-1).sum())


# ----------------------------------------------------------------------------- denormalize, save_png
def test_denormalize_inverts_the_encoder_normalisation():
    images = _random_images(2, 5, 7, seed=0, lo=0, hi=255)
    batch = torch.stack([to_tensor(Image.fromarray(im)) for im in images])  # [2, 3, 5, 7]
    out = vis.denormalize(batch)
    assert out.dtype == np.uint8 and out.shape == (2, 5, 7, 3)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(vis.denormalize(batch[1]), images[1])  # [3, H, W] -> [H, W, 3]
    # values outside [-1, 1] clip to 0 / 255
    np.testing.assert_array_equal(vis.denormalize(torch.tensor([-3.0, 0.0, 3.0]).view(1, 3, 1, 1)),
                                  [[[[0, 128, 255]]]])


def test_save_png_roundtrip_and_refuses_non_images(tmp_path):
    img = _random_images(1, 9, 11, seed=1, lo=0, hi=255)[0]
    path = vis.save_png(img, tmp_path / "sub" / "x.png")
    with Image.open(path) as f:
        assert f.format == "PNG" and f.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(f), img)
    with pytest.raises(ValueError, match="uint8"):
        vis.save_png(img.astype(np.float32), tmp_path / "y.png")


# ----------------------------------------------------------------------------- mask figure
def _hand_mask(relevance, keep):
    """Keep the ``keep`` most relevant patches (a plain argsort)."""
    mask = np.zeros_like(relevance)
    for i, row in enumerate(relevance):
        mask[i, np.argsort(-row, kind="stable")[:keep]] = 1
    return mask


def test_mask_figure_layout_panels_and_titles():
    b, h, w, g = 3, 32, 32, 4
    photos = _random_images(b, h, w, seed=2)
    rng = np.random.default_rng(3)
    relevance = rng.normal(size=(b, g * g)).astype(np.float32)
    keep = _hand_mask(relevance, 5)
    grid = (2, 2)
    fig = vis.mask_figure(photos, relevance, keep, ["cat", "a very long class name indeed", "dog"], grid)

    # size from the layout: cells of (title line + photo) x (3 panels + 2 gaps), margins around/between
    rows, cols = grid
    assert fig.shape == (rows * (vis.TEXT_H + h) + (rows + 1) * vis.MARGIN,
                         cols * (3 * w + 2 * vis.GAP) + (cols + 1) * vis.MARGIN, 3)
    assert fig.shape[:2] == vis.mask_figure_size((h, w), grid)
    assert fig.dtype == np.uint8
    for i in range(b):
        top, left = vis.mask_panel_origin(i, 0, (h, w), grid)
        np.testing.assert_array_equal(fig[top:top + h, left:left + w], photos[i])  # panel 1: the photo
        # panel 3: exactly the dropped patches are grey, the kept ones are the photo's pixels
        kept = _kept_panel(fig, i, (h, w), grid)
        dropped = _patch_is_fill(kept, g)
        np.testing.assert_array_equal(dropped, keep[i].reshape(g, g) == 0)
        assert (~dropped).sum() == 5
        pix = np.kron(keep[i].reshape(g, g), np.ones((h // g, w // g))).astype(bool)
        np.testing.assert_array_equal(kept[pix], photos[i][pix])
        # the title line above the photo holds dark text pixels
        assert fig[top - vis.TEXT_H:top, left:left + w].min() < 100
    # the fourth cell of the 2x2 grid is empty (white)
    top, left = vis.mask_panel_origin(3, 0, (h, w), grid)
    assert (fig[top - vis.TEXT_H:top + h, left:left + 3 * w + 2 * vis.GAP] == 255).all()


def test_relevance_panel_colours_follow_the_relevance():
    # black photo: the panel is HEATMAP_ALPHA * jet(scaled relevance); the most relevant patch
    # is red-ish (jet(1) = dark red), the least relevant blue-ish (jet(0) = dark blue)
    g, h = 4, 32
    photos = np.zeros((1, h, h, 3), np.uint8)
    relevance = np.zeros((1, g * g), np.float32)
    relevance[0, 5] = 2.0  # row 1, col 1
    relevance[0, 15] = -1.0  # row 3, col 3
    fig = vis.mask_figure(photos, relevance, np.ones_like(relevance), ["x"], (1, 1))
    top, left = vis.mask_panel_origin(0, 1, (h, h), (1, 1))
    heat = fig[top:top + h, left:left + h].astype(int)
    p = h // g
    hot = heat[1 * p + p // 2, 1 * p + p // 2]
    cold = heat[3 * p + p // 2, 3 * p + p // 2]
    assert hot[0] > 40 and hot[2] < 10  # ~ 0.5 * 255 * jet(~1) = (64, 0, 0)
    assert cold[2] > 40 and cold[0] < 10  # ~ 0.5 * 255 * jet(0) = (0, 0, 64)
    # constant relevance does not divide by zero
    flat = vis.mask_figure(photos, np.ones_like(relevance), np.ones_like(relevance), ["x"], (1, 1))
    assert flat.shape == fig.shape


def test_mask_figure_rejects_inconsistent_inputs():
    photos = _random_images(2, 16, 16, seed=4)
    rel = np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError, match="class names"):
        vis.mask_figure(photos, rel, rel, ["only one"])
    with pytest.raises(ValueError, match="square grid"):
        vis.mask_figure(photos, np.zeros((2, 15)), np.zeros((2, 15)), ["a", "b"])
    with pytest.raises(ValueError, match="no room"):
        vis.mask_figure(photos, rel, rel, ["a", "b"], grid=(1, 1))


# ----------------------------------------------------------------------------- retrieval grid
def test_retrieval_grid_frames_scores_and_size():
    tile = 40
    query = _random_images(1, 50, 30, seed=5)[0]
    results = [_random_images(1, s, t, seed=6 + s)[0] for s, t in ((40, 40), (20, 60), (33, 33), (64, 16), (12, 12))]
    correct = [True, False, None, True, False]
    img = vis.retrieval_grid(query, results, correct=correct, scores=[0.9, 0.8, 0.7, 0.6, 0.5],
                             titles=["cat", "dog", "?", "cat", "dog"], query_title="cat", tile_size=tile)
    k = len(results)
    framed = tile + 2 * vis.BORDER
    assert img.shape == (2 * vis.MARGIN + framed + vis.CAPTION_LINES * vis.TEXT_H,
                         2 * vis.MARGIN + (k + 1) * framed + (k - 1) * vis.GAP + vis.QUERY_GAP, 3)
    assert img.shape[:2] == vis.retrieval_grid_size(k, tile)
    expected = [vis.BLUE] + [vis.NEUTRAL if c is None else (vis.GREEN if c else vis.RED) for c in correct]
    assert [_frame_colour(img, i, tile) for i in range(k + 1)] == expected
    # counted independently over the whole picture: 2 green and 2 red frames, nothing else that colour
    ring = framed ** 2 - tile ** 2
    assert _count_colour(img, vis.GREEN) == 2 * ring
    assert _count_colour(img, vis.RED) == 2 * ring
    # a square result of the tile's size is pasted as it is; a wide one is padded white above/below
    top, left = vis.retrieval_tile_origin(1, tile)
    inner = img[top + vis.BORDER:top + vis.BORDER + tile, left + vis.BORDER:left + vis.BORDER + tile]
    np.testing.assert_array_equal(inner, results[0])
    top, left = vis.retrieval_tile_origin(2, tile)
    inner = img[top + vis.BORDER:top + vis.BORDER + tile, left + vis.BORDER:left + vis.BORDER + tile]
    assert (inner[:10] == 255).all() and (inner[-10:] == 255).all() and not (inner[tile // 2] == 255).all()
    # captions: text (dark pixels) under each result
    for i in range(1, k + 1):
        top, left = vis.retrieval_tile_origin(i, tile)
        assert img[top + framed:top + framed + 2 * vis.TEXT_H, left:left + framed].min() < 100


def test_retrieval_grid_without_correctness_and_bad_lengths():
    res = list(_random_images(3, 20, 20, seed=9))
    img = vis.retrieval_grid(res[0], res, tile_size=20)
    assert [_frame_colour(img, i, 20) for i in range(4)] == [vis.BLUE] + [vis.NEUTRAL] * 3
    assert _count_colour(img, vis.GREEN) == _count_colour(img, vis.RED) == 0
    with pytest.raises(ValueError, match="scores has 2 entries for 3 results"):
        vis.retrieval_grid(res[0], res, scores=[1.0, 2.0])


# ----------------------------------------------------------------------------- ranking, choosing
def test_cosine_ranking_matches_utils_metrics_ranks():
    from utils.metrics import relevant_ranks

    rng = np.random.default_rng(10)
    gallery = rng.normal(size=(12, 6)).astype(np.float32)
    gallery[7] = gallery[9] = gallery[2]  # exact cosine ties with item 2
    queries = np.concatenate([rng.normal(size=(3, 6)), gallery[2:3] * 0.5]).astype(np.float32)
    order, sims = vis.cosine_ranking(queries, gallery)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    np.testing.assert_allclose(sims, q @ g.T, atol=1e-6)
    # the rank utils.metrics gives every single gallery item is its position in our order
    sims_t = torch.from_numpy(sims)
    for j in range(len(gallery)):
        ranks = relevant_ranks(sims_t, torch.tensor([j]))[:, 0].numpy()  # [Q] 1-based
        np.testing.assert_array_equal(ranks, [int(np.flatnonzero(order[i] == j)[0]) + 1 for i in range(4)])
    # the tie (2, 7, 9) keeps gallery order at the top of the last query
    assert list(order[3, :3]) == [2, 7, 9]


def test_select_items_spreads_over_classes_reproducibly():
    items = [(f"{c}/{i}.jpg", c) for c in ("a", "b", "c") for i in range(4)]
    three = vis.select_items(items, 3, seed=1)
    assert sorted(c for _, c in three) == ["a", "b", "c"]
    seven = vis.select_items(items, 7, seed=1)
    counts = sorted(sum(c == k for _, c in seven) for k in "abc")
    assert counts == [2, 2, 3] and len(set(seven)) == 7
    assert vis.select_items(items, 7, seed=1) == seven
    assert vis.select_items(items, 7, seed=2) != seven
    assert sorted(vis.select_items(items, 50, seed=0)) == sorted(items)


# ----------------------------------------------------------------------------- summaries (tiny model)
# tiny_sampler (conftest.py): the tiny preset's sampler, SIZE px images in 8 px patches


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    from datasets.synthetic import draw_photo

    folder = tmp_path_factory.mktemp("photos")
    items = []
    for i, name in enumerate(["sun", "house", "car"]):
        path = folder / f"{name}.jpg"
        draw_photo(name, i, size=96).save(path, quality=95)
        items.append((str(path), name))
    return items


def _expected_masks(sampler, items, size=SIZE):
    from datasets.transforms import load_image

    photos = torch.stack([preprocess_photo(load_image(p), size) for p, _ in items])
    return sampler(photos, [c for _, c in items]).numpy()  # [B, N] via the sampler's forward


def test_mask_summary_shows_the_samplers_kept_patches(tiny_sampler, photo_files):
    fig = vis.mask_summary(tiny_sampler, photo_files, image_size=SIZE)
    grid = (3, 1)
    assert fig.shape[:2] == vis.mask_figure_size((SIZE, SIZE), grid)
    masks = _expected_masks(tiny_sampler, photo_files)
    kept_count = N_PATCHES - (math.floor(N_PATCHES * 0.7) + 1)  # 64 - 45 = 19
    assert (masks.sum(1) == kept_count).all()
    for i in range(3):
        dropped = _patch_is_fill(_kept_panel(fig, i, (SIZE, SIZE), grid), 8)
        assert (~dropped).sum() == kept_count
        np.testing.assert_array_equal(~dropped, masks[i].reshape(8, 8) > 0.5)


def test_retrieval_summary_and_tensorboard(tmp_path, photo_files):
    from datasets.synthetic import draw_sketch
    from datasets.transforms import load_image, preprocess_sketch
    from models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_config(), with_sampler=False)
    model.train()
    gallery_items = list(photo_files) + [(p, c) for p, c in photo_files]  # 6 items, duplicated photos
    gallery = torch.stack([preprocess_photo(load_image(p), SIZE) for p, _ in gallery_items])
    queries = []
    for i, name in enumerate(["sun", "car"]):
        path = tmp_path / f"q_{name}.png"
        draw_sketch(name, 10 + i, size=80).save(path)
        queries.append((str(path), name))
    model.eval()
    with torch.no_grad():
        g_feats = model.encode(gallery, "photo")
        q_feats = model.encode(torch.stack([preprocess_sketch(load_image(p), SIZE) for p, _ in queries]), "sketch")
    model.train()

    topk, tile = 4, 48
    img = vis.retrieval_summary(model, queries, g_feats, gallery_items, image_size=SIZE,
                                device=torch.device("cpu"), topk=topk, tile_size=tile)
    assert model.training  # mode restored
    row_h, row_w = vis.retrieval_grid_size(topk, tile)
    assert img.shape == (2 * row_h, row_w, 3)
    # frames: independently ranked here with a plain stable argsort of the cosine
    sims = torch.nn.functional.normalize(q_feats, dim=1) @ torch.nn.functional.normalize(g_feats, dim=1).T
    for qi, (_, qclass) in enumerate(queries):
        top = np.argsort(-sims[qi].numpy(), kind="stable")[:topk]
        row = img[qi * row_h:(qi + 1) * row_h]
        got = [_frame_colour(row, i, tile) for i in range(1, topk + 1)]
        assert got == [vis.GREEN if gallery_items[j][1] == qclass else vis.RED for j in top]

    # the HWC uint8 picture goes to TensorBoard as it is
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from utils.logger import ExperimentLogger

    logger = ExperimentLogger(tmp_path / "run")
    logger.image("retrieval", img, 3)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    event = acc.Images("retrieval")[0]
    assert (event.step, event.height, event.width) == (3, img.shape[0], img.shape[1])


# ----------------------------------------------------------------------------- tools.visualize_masks
def test_visualize_masks_tool_on_photos(tmp_path, tiny_sampler, photo_files):
    from tools import visualize_masks

    out = tmp_path / "masks"
    written = visualize_masks.main(["--photos", *[p for p, _ in photo_files],
                                    "--classes", *[c for _, c in photo_files],
                                    "--arch", "tiny", "--batch", "2", "--out", str(out), "--device", "cpu"])
    assert [p.name for p in written] == ["masks_000.png", "masks_001.png"]
    assert sorted(p.name for p in out.iterdir()) == ["masks_000.png", "masks_001.png"]
    masks = _expected_masks(tiny_sampler, photo_files)
    for b, path in enumerate(written):
        with Image.open(path) as f:
            fig = np.asarray(f.convert("RGB"))
        n = 2 if b == 0 else 1
        assert fig.shape[:2] == vis.mask_figure_size((SIZE, SIZE), (n, 1))
        for i in range(n):
            kept = ~_patch_is_fill(_kept_panel(fig, i, (SIZE, SIZE), (n, 1)), 8)
            np.testing.assert_array_equal(kept, masks[2 * b + i].reshape(8, 8) > 0.5)
            assert kept.sum() == masks[2 * b + i].sum()


@pytest.fixture(scope="module")
def mini_benchmark(make_benchmark):
    return make_benchmark(seen=["sun", "moon", "star"], unseen=["kite", "tent"], per_class=(1, 3), unseen_per_class=2,
                          size=48)


def test_visualize_masks_tool_takes_settings_from_a_checkpoint(tmp_path, mini_benchmark):
    from datasets import load_benchmark
    from models.vxl_sampler import VxLSampler
    from tools import visualize_masks
    from utils.checkpoint import save_checkpoint

    ckpt = save_checkpoint({"model": {}, "args": {"arch": "tiny", "keep_ratio": 0.5, "prompt": "a photo of {}",
                                                   "vxl_norm": "token", "clip_input_norm": "encoder",
                                                   "clip_weights": None, "data_path": str(mini_benchmark),
                                                   "dataset": "sketchy_extend", "custom_split": True,
                                                   "test_class": "test_class_sketchy25"}},
                           tmp_path / "ckpt.pth")
    out = tmp_path / "masks"
    written = visualize_masks.main(["--checkpoint", str(ckpt), "--split", "train", "--num", "3", "--seed", "4",
                                    "--out", str(out), "--device", "cpu"])
    assert len(written) == 1
    split = load_benchmark(mini_benchmark, "sketchy_extend", "test_class_sketchy25", check_canonical=False)
    items = vis.select_items([(str(p), c) for c, ps in split.train_photos.items() for p in ps], 3, seed=4)
    assert sorted(c for _, c in items) == ["moon", "star", "sun"]  # 3 seen classes, one photo each
    sampler = VxLSampler.tiny(keep_ratio=0.5, prompt="a photo of {}")
    masks = _expected_masks(sampler, items)
    assert (masks.sum(1) == N_PATCHES - (math.floor(N_PATCHES * 0.5) + 1)).all()  # 31 kept: the saved ratio
    with Image.open(written[0]) as f:
        fig = np.asarray(f.convert("RGB"))
    assert fig.shape[:2] == vis.mask_figure_size((SIZE, SIZE), (3, 1))
    for i in range(3):
        kept = ~_patch_is_fill(_kept_panel(fig, i, (SIZE, SIZE), (3, 1)), 8)
        np.testing.assert_array_equal(kept, masks[i].reshape(8, 8) > 0.5)


def test_visualize_masks_tool_defaults_to_the_synthetic_benchmark(tmp_path, monkeypatch, mini_benchmark):
    import datasets.synthetic
    from tools import visualize_masks

    asked = []
    monkeypatch.setattr(datasets.synthetic, "ensure_synthetic_benchmark",
                        lambda cache_dir=None, **kw: asked.append(cache_dir) or mini_benchmark)
    written = visualize_masks.main(["--split", "test", "--num", "2", "--synthetic_dir", str(tmp_path / "syn"),
                                    "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert asked == [str(tmp_path / "syn")] and len(written) == 1
    with Image.open(written[0]) as f:  # 2 unseen photos, tiny sampler (no --clip_weights, no --data_path)
        assert f.size[::-1] == vis.mask_figure_size((SIZE, SIZE), (2, 1))


@pytest.mark.parametrize("case", ["classes_mismatch", "b16_without_clip", "not_an_image", "missing_photo"])
def test_visualize_masks_tool_bad_input(tmp_path, capsys, photo_files, case):
    from tools import visualize_masks

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    argv, expect = {
        "classes_mismatch": (["--photos", photo_files[0][0], photo_files[1][0], "--classes", "sun"],
                             "one class name per photo"),
        "b16_without_clip": (["--arch", "b16", "--photos", photo_files[0][0], "--classes", "sun"],
                             "--clip_weights"),
        "not_an_image": (["--arch", "tiny", "--photos", str(bad), "--classes", "sun"], str(bad)),
        "missing_photo": (["--arch", "tiny", "--photos", str(tmp_path / "nope.jpg"), "--classes", "sun"],
                          "nope.jpg: image file not found"),
    }[case]
    with pytest.raises(SystemExit) as exc:
        visualize_masks.main(argv + ["--out", str(tmp_path / "o"), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
