"""tools.retrieve: ranking, picture, embedding cache and bad input, on a tiny checkpoint and gallery."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.synthetic import draw_photo, draw_sketch
from datasets.transforms import load_image, preprocess_photo, preprocess_sketch
from models import PuXIM, build_model
from tools import retrieve
from utils import visualize as vis
from utils.checkpoint import model_state_dict, rng_state, save_checkpoint
from utils.config import config_from_saved

SIZE = 64
TILE = 40
TRAIN_ARGS = dict(arch="tiny", image_size=SIZE, vit_weights=None, clip_weights=None, keep_ratio=0.3, prompt="{}",
                  vxl_norm="token", clip_input_norm="encoder", variant="puxim", int_memory="masked",
                  separate_encoders=False, dropout=None, data_path=None, dataset="sketchy_extend",
                  test_class="test_class_sketchy25", custom_split=False, synthetic_dir=None, seed=0)


def _save_train_checkpoint(model, path, **overrides):
    """A checkpoint with the keys train.py writes."""
    args = {**TRAIN_ARGS, **overrides}
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
    return save_checkpoint({
        "model": model_state_dict(model), "optimizer": optimizer.state_dict(), "scaler": None,
        "next_epoch": 1, "skip_batches": 0, "global_step": 10, "best": {"mAP@all": 0.1, "epoch": 0},
        "rng": rng_state(), "args": args, "arch": args["arch"], "format": 1,
    }, path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve")
    torch.manual_seed(0)
    model = build_model(config_from_saved(TRAIN_ARGS), with_sampler=False).eval()
    ckpt = _save_train_checkpoint(model, root / "best.pth")
    gallery = root / "gallery"
    files = []  # (path, class or "")
    for ci, cls in enumerate(["sun", "house", "car"]):
        (gallery / cls).mkdir(parents=True)
        for i in range(2):
            path = gallery / cls / f"{cls}_{i}.{'jpg' if i else 'png'}"
            draw_photo(cls, 10 * ci + i, size=56 + 8 * i).save(path)
            files.append((path, cls))
    for i, cls in enumerate(["tree", "fish"]):  # loose photos: no class known
        path = gallery / f"loose_{i}.jpeg"
        draw_photo(cls, 100 + i, size=50).save(path)
        files.append((path, ""))
    (gallery / "notes.txt").write_text("not an image, not in the gallery")
    (root / "sketches" / "sun").mkdir(parents=True)
    sketch = root / "sketches" / "sun" / "my sketch.png"
    draw_sketch("sun", 7, size=90).save(sketch)
    return dict(root=root, model=model, ckpt=ckpt, gallery=gallery, files=files, sketch=sketch)


def _run(s, tmp_path, *extra, cache=None):
    argv = ["--checkpoint", str(s["ckpt"]), "--sketch", str(s["sketch"]), "--gallery", str(s["gallery"]),
            "--cache_dir", str(cache or tmp_path / "cache"), "--device", "cpu", "--no_progress",
            "--tile_size", str(TILE), "--batch_size", "3", *extra]
    return retrieve.main(argv)


def _expected_ranking(model, sketch, files):
    """Independent ranking: encode everything here, cosine, stable descending sort."""
    with torch.no_grad():
        q = model.encode(preprocess_sketch(load_image(sketch), SIZE)[None], "sketch")  # [1, D]
        g = model.encode(torch.stack([preprocess_photo(load_image(p), SIZE) for p, _ in files]), "photo")
    sims = (torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T)[0].numpy()
    order = np.argsort(-sims, kind="stable")
    return [(str(files[i][0].resolve()), float(sims[i]), files[i][1]) for i in order]


def _frame(img, i):
    top, left = vis.retrieval_tile_origin(i, TILE)
    framed = TILE + 2 * vis.BORDER
    box = img[top:top + framed, left:left + framed]
    ring = np.ones((framed, framed), bool)
    ring[vis.BORDER:-vis.BORDER, vis.BORDER:-vis.BORDER] = False
    colours = np.unique(box[ring].reshape(-1, 3), axis=0)
    return tuple(int(c) for c in colours[0]) if len(colours) == 1 else None


def test_ranking_printout_and_picture(setup, tmp_path, capsys):
    out = tmp_path / "grid.png"
    k = 5
    results = _run(setup, tmp_path, "--topk", str(k), "--out", str(out))
    expected = _expected_ranking(setup["model"], setup["sketch"], setup["files"])[:k]
    assert [p for p, _ in results] == [p for p, _, _ in expected]
    np.testing.assert_allclose([s for _, s in results], [s for _, s, _ in expected], atol=1e-5)
    printed = capsys.readouterr().out
    for rank, (path, score, cls) in enumerate(expected, 1):
        assert f"{score:7.4f}" in printed and path in printed

    with Image.open(out) as f:
        img = np.asarray(f.convert("RGB"))
    assert img.shape[:2] == vis.retrieval_grid_size(k, TILE)
    # the sketch sits in a folder "sun", a class of the gallery: green = sun, red = other class,
    # grey = loose photo (no class)
    want = [vis.NEUTRAL if not cls else (vis.GREEN if cls == "sun" else vis.RED) for _, _, cls in expected]
    assert [_frame(img, i) for i in range(k + 1)] == [vis.BLUE] + want
    ring = (TILE + 2 * vis.BORDER) ** 2 - TILE ** 2
    for colour in (vis.GREEN, vis.RED):
        pixels = int((img == np.array(colour, np.uint8)).all(-1).sum())
        assert pixels == ring * want.count(colour)


def test_sketch_class_option_overrides_the_folder(setup, tmp_path):
    out = tmp_path / "g.png"
    _run(setup, tmp_path, "--topk", "8", "--out", str(out), "--sketch_class", "car")
    expected = _expected_ranking(setup["model"], setup["sketch"], setup["files"])
    with Image.open(out) as f:
        img = np.asarray(f.convert("RGB"))
    want = [vis.NEUTRAL if not cls else (vis.GREEN if cls == "car" else vis.RED) for _, _, cls in expected]
    assert [_frame(img, i) for i in range(1, 9)] == want
    assert want.count(vis.GREEN) == 2 and want.count(vis.NEUTRAL) == 2


def test_embedding_cache_reuse_and_invalidation(setup, tmp_path, monkeypatch, caplog):
    calls = {"photo": 0, "sketch": 0}
    real_encode = PuXIM.encode

    def counting_encode(self, images, modality="photo"):
        calls[modality] += images.shape[0]
        return real_encode(self, images, modality)

    monkeypatch.setattr(PuXIM, "encode", counting_encode)
    gallery = setup["root"] / "gallery_cache"
    import shutil
    shutil.copytree(setup["gallery"], gallery)
    s = {**setup, "gallery": gallery}
    cache = tmp_path / "cache"

    def run():
        calls.update(photo=0, sketch=0)
        caplog.clear()
        with caplog.at_level("INFO"):
            res = _run(s, tmp_path, "--topk", "3", "--out", str(tmp_path / "g.png"), cache=cache)
        return res, calls["photo"], caplog.text

    first, n, text = run()
    assert n == 8 and "embedding 8 gallery images" in text
    assert len(list(cache.glob("*.npz"))) == 1
    again, n, text = run()
    assert n == 0 and "using cached gallery embeddings" in text
    assert calls["sketch"] == 1
    assert again == first

    # a file added
    draw_photo("car", 55, size=60).save(gallery / "car" / "car_new.png")
    _, n, text = run()
    assert n == 9 and "embedding 9 gallery images" in text
    _, n, _ = run()
    assert n == 0
    # a file touched (new modification time)
    st = os.stat(gallery / "sun" / "sun_0.png")
    os.utime(gallery / "sun" / "sun_0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    _, n, _ = run()
    assert n == 9
    # a file removed
    (gallery / "house" / "house_1.jpg").unlink()
    _, n, text = run()
    assert n == 8 and "embedding 8 gallery images" in text
    # the checkpoint rewritten (as training does every epoch)
    _save_train_checkpoint(setup["model"], setup["ckpt"])
    st = os.stat(setup["ckpt"])
    os.utime(setup["ckpt"], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    _, n, _ = run()
    assert n == 8
    _, n, _ = run()
    assert n == 0
    assert len(list(cache.glob("*.npz"))) == 1  # one slot per (checkpoint, gallery): replaced, not piled up


def test_checkpoint_whose_data_root_moved_says_what_to_pass(tmp_path, setup, capsys):
    ckpt = _save_train_checkpoint(setup["model"], tmp_path / "ckpt.pth", data_path=str(tmp_path / "moved"),
                                  custom_split=True)
    with pytest.raises(SystemExit) as exc:
        retrieve.main(["--checkpoint", str(ckpt), "--sketch", str(setup["sketch"]), "--device", "cpu",
                       "--no_progress", "--cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"trained on --data_path {tmp_path / 'moved'}, which is not there" in err
    assert "--gallery FOLDER" in err and "synthetic" not in err


def test_default_gallery_is_the_checkpoints_split(tmp_path, setup, make_benchmark):
    from datasets import load_benchmark

    bench = make_benchmark(seen=["sun"], unseen=["kite", "tent"], per_class=1, unseen_per_class=3, size=48)
    ckpt = _save_train_checkpoint(setup["model"], tmp_path / "ckpt.pth", data_path=str(bench), custom_split=True)
    split = load_benchmark(bench, "sketchy_extend", "test_class_sketchy25", check_canonical=False)
    sketch = split.test_sketches[0][0]  # a kite sketch, in a folder named kite
    out = tmp_path / "g.png"
    results = retrieve.main(["--checkpoint", str(ckpt), "--sketch", str(sketch), "--topk", "6", "--out", str(out),
                             "--cache_dir", str(tmp_path / "c"), "--device", "cpu", "--no_progress",
                             "--tile_size", str(TILE)])
    files = [(Path(p), c) for p, c in split.test_photos]
    expected = _expected_ranking(setup["model"], sketch, files)
    assert [p for p, _ in results] == [p for p, _, _ in expected]
    with Image.open(out) as f:
        img = np.asarray(f.convert("RGB"))
    assert [_frame(img, i) for i in range(1, 7)] == \
        [vis.GREEN if cls == "kite" else vis.RED for _, _, cls in expected]


def test_synthetic_checkpoint_uses_the_synthetic_benchmark(tmp_path, setup, make_benchmark, monkeypatch):
    import datasets.synthetic

    bench = make_benchmark(seen=["sun"], unseen=["kite", "tent"], per_class=1, unseen_per_class=2, size=48)
    asked = []
    monkeypatch.setattr(datasets.synthetic, "ensure_synthetic_benchmark",
                        lambda cache_dir=None, **kw: asked.append(cache_dir) or bench)
    ckpt = _save_train_checkpoint(setup["model"], tmp_path / "ckpt.pth", synthetic_dir="/saved/synthetic")
    results = retrieve.main(["--checkpoint", str(ckpt), "--sketch", str(setup["sketch"]), "--topk", "4",
                             "--out", str(tmp_path / "g.png"), "--cache_dir", str(tmp_path / "c"),
                             "--device", "cpu", "--no_progress"])
    assert asked == ["/saved/synthetic"]  # the checkpoint's own synthetic benchmark
    assert len(results) == 4 and all(str(bench) in p for p, _ in results)


@pytest.mark.parametrize("case", ["sketch_not_image", "sketch_missing", "empty_gallery", "gallery_missing",
                                  "topk_too_large", "topk_zero", "arch_mismatch", "checkpoint_missing",
                                  "corrupt_gallery_image", "blank_sketch", "out_is_a_folder"])
def test_bad_input_exits_2_with_a_message(setup, tmp_path, capsys, case):
    ckpt, sketch, gallery = str(setup["ckpt"]), str(setup["sketch"]), str(setup["gallery"])
    topk = "3"
    if case == "sketch_not_image":
        sketch = str(tmp_path / "sketch.png")
        Path(sketch).write_text("hello")
        expect = f"{sketch}: cannot read the image"
    elif case == "sketch_missing":
        sketch = str(tmp_path / "absent.png")
        expect = f"{sketch}: image file not found"
    elif case == "empty_gallery":
        gallery = str(tmp_path / "empty")
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "empty" / "readme.txt").write_text("x")
        expect = "no images found"
    elif case == "gallery_missing":
        gallery = str(tmp_path / "nowhere")
        expect = "not a folder"
    elif case == "topk_too_large":
        topk = "9"
        expect = "--topk 9 must be between 1 and the gallery size, 8 images"
    elif case == "topk_zero":
        topk = "0"
        expect = "--topk 0 must be between 1"
    elif case == "arch_mismatch":
        torch.manual_seed(0)
        untied = build_model(config_from_saved({**TRAIN_ARGS, "separate_encoders": True}), with_sampler=False)
        # weights of untied encoders under args that say tied: the saved args do not match the weights
        ckpt = str(_save_train_checkpoint(untied, tmp_path / "bad.pth"))
        expect = "does not match this model's architecture"
    elif case == "corrupt_gallery_image":
        gallery = str(tmp_path / "gal")
        (tmp_path / "gal" / "cat").mkdir(parents=True)
        draw_photo("sun", 1, size=40).save(tmp_path / "gal" / "cat" / "ok.jpg")
        (tmp_path / "gal" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
        topk = "1"
        expect = "broken.jpg: cannot read the image"
    elif case == "blank_sketch":
        sketch = str(tmp_path / "blank.png")
        Image.new("RGB", (64, 64), (250, 250, 250)).save(sketch)
        expect = f"{sketch}: the sketch is blank"
    elif case == "out_is_a_folder":
        out = tmp_path / "pictures"
        out.mkdir()
        expect = f"--out {out} is a folder"
    else:
        ckpt = str(tmp_path / "none.pth")
        expect = "none.pth does not exist"
    out = tmp_path / "pictures" if case == "out_is_a_folder" else tmp_path / "g.png"
    with pytest.raises(SystemExit) as exc:
        retrieve.main(["--checkpoint", ckpt, "--sketch", sketch, "--gallery", gallery, "--topk", topk,
                       "--cache_dir", str(tmp_path / "cache"), "--out", str(out),
                       "--device", "cpu", "--no_progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


def test_faiss_index_gives_the_exact_ranking_and_is_cached_beside_the_embeddings(setup, tmp_path, caplog):
    cache = tmp_path / "cache"
    exact = _run(setup, tmp_path, "--topk", "6", "--out", str(tmp_path / "e.png"), "--index", "exact", cache=cache)
    with caplog.at_level("INFO"):
        faiss = _run(setup, tmp_path, "--topk", "6", "--out", str(tmp_path / "f.png"), "--index", "faiss",
                     cache=cache)
    assert "building a FAISS IVF-Flat index (1 cells) over 8 vectors" in caplog.text  # 8 photos: one cell, exact
    assert [p for p, _ in faiss] == [p for p, _ in exact]
    np.testing.assert_allclose([s for _, s in faiss], [s for _, s in exact], atol=1e-5)
    (embeddings,) = cache.glob("gallery-*[0-9a-f].npz")
    assert (cache / (embeddings.stem + "-faiss.npz")).is_file()
    caplog.clear()
    with caplog.at_level("INFO"):
        _run(setup, tmp_path, "--topk", "6", "--out", str(tmp_path / "f.png"), "--index", "faiss", cache=cache)
    assert "using the cached FAISS index" in caplog.text and "building" not in caplog.text
