"""Tests of the built-in synthetic benchmark (datasets/synthetic.py): classes, images, layout,
determinism, caching and atomic writes. Every benchmark here is tiny and lives in tmp_path."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import synthetic
from datasets.synthetic import (CLASSES, SEEN_CLASSES, UNSEEN_CLASSES, SyntheticBenchmarkError, draw_photo,
                                draw_sketch, ensure_synthetic_benchmark, make_synthetic_benchmark)

SMALL = dict(sketches_per_class=3, photos_per_class=2, unseen_per_class=2)
FEW_CLASSES = ("sun", "house", "key", "kite", "tent")  # 3 seen, 2 unseen
LISTS = {  # list file -> (kind, split)
    "sketch_tx_000000000000_ready_filelist_train.txt": ("sketch", "train"),
    "all_photo_filelist_train.txt": ("photo", "train"),
    "sketch_tx_000000000000_ready_filelist_zero.txt": ("sketch", "zero"),
    "all_photo_filelist_zero.txt": ("photo", "zero"),
}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _paper_white(img: Image.Image) -> float:
    """Fraction of pixels whose three channels are all >= 245 (blank paper)."""
    a = np.asarray(img.convert("RGB"))
    return float((a >= 245).all(axis=-1).mean())


def _mid_tone(img: Image.Image) -> float:
    """Fraction of pixels that are neither ink nor blank paper: filled colour, texture, background."""
    a = np.asarray(img.convert("RGB"))
    return float(((a.astype(int).sum(-1) > 300) & ~(a >= 245).all(axis=-1)).mean())


def _ink(img: Image.Image) -> float:
    """Fraction of "ink" pixels by the sketch-crop rule of REFERENCE.md (R+G+B <= 300)."""
    return float((np.asarray(img.convert("RGB")).astype(int).sum(-1) <= 300).mean())


@pytest.fixture(scope="module")
def small_root(make_benchmark) -> Path:
    """make_synthetic_benchmark(classes=FEW_CLASSES, **SMALL), 128 px (its default size)."""
    return make_benchmark(seen=FEW_CLASSES[:3], unseen=FEW_CLASSES[3:], per_class=(3, 2), unseen_per_class=2, size=128)


# ------------------------------------------------------------------------------------------ classes
def test_classes_and_fixed_split():
    assert len(CLASSES) >= 24 and len(set(CLASSES)) == len(CLASSES)
    assert 6 <= len(UNSEEN_CLASSES) <= 8
    assert set(UNSEEN_CLASSES) <= set(CLASSES)
    assert set(SEEN_CLASSES).isdisjoint(UNSEEN_CLASSES)
    assert sorted(SEEN_CLASSES + UNSEEN_CLASSES) == sorted(CLASSES)


def test_class_names_are_real_words_clip_knows():
    # Every name is one lowercase word that CLIP's BPE vocabulary holds as a whole word
    # ("sun</w>"), i.e. a common English word whose text embedding means something.
    import open_clip.tokenizer as tok

    with gzip.open(tok.default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    whole_words = {"".join(m.split()) for m in merges if m.endswith("</w>")}
    for name in CLASSES:
        assert name.isascii() and name.isalpha() and name.islower(), name
        assert name + "</w>" in whole_words, f"{name!r} is not a whole word in CLIP's vocabulary"


def test_unknown_class_is_a_clear_error(tmp_path):
    with pytest.raises(SyntheticBenchmarkError, match="'unicorn'"):
        draw_sketch("unicorn", 0)
    with pytest.raises(SyntheticBenchmarkError, match="'unicorn'"):
        make_synthetic_benchmark(tmp_path / "r", classes=["sun", "unicorn", "kite"], progress=False)
    with pytest.raises(SyntheticBenchmarkError, match="unseen"):
        make_synthetic_benchmark(tmp_path / "r", classes=["sun", "house"], progress=False)
    with pytest.raises(SyntheticBenchmarkError, match="photos_per_class"):
        make_synthetic_benchmark(tmp_path / "r", classes=FEW_CLASSES, photos_per_class=0, progress=False)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("name", CLASSES)
def test_every_class_draws_a_sketch_and_a_photo(name):
    sketch, photo = draw_sketch(name, np.random.default_rng(1)), draw_photo(name, np.random.default_rng(1))
    for img in (sketch, photo):
        assert img.mode == "RGB" and img.size == (128, 128)
    # sketch: mostly blank paper, with some dark strokes (and their anti-aliased edges)
    assert _paper_white(sketch) > 0.75 and _mid_tone(sketch) < 0.15
    assert 0.003 < _ink(sketch) < 0.2
    # photo: filled, textured colour and background everywhere, not paper with lines
    assert _paper_white(photo) < 0.5 and _mid_tone(photo) > 0.5


def test_draw_is_reproducible_from_the_rng_and_size_is_honoured():
    a = np.asarray(draw_photo("boat", np.random.default_rng(7), size=64))
    b = np.asarray(draw_photo("boat", np.random.default_rng(7), size=64))
    c = np.asarray(draw_photo("boat", np.random.default_rng(8), size=64))
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.asarray(draw_sketch("boat", 3)), np.asarray(draw_sketch("boat", 3)))


def test_photo_distractors_are_seen_classes_only(monkeypatch):
    # Record which class drawers run for each photo: the main class plus 1-2 distractors, and
    # never an unseen class other than the main one (unseen objects must not leak into training).
    calls = []
    for name, fn in list(synthetic._DRAWERS.items()):
        def recording(rng, fn=fn, name=name):
            calls.append(name)
            return fn(rng)

        monkeypatch.setitem(synthetic._DRAWERS, name, recording)
    for main in ("sun", "kite"):
        for i in range(12):
            calls.clear()
            draw_photo(main, i)
            assert calls[-1] == main, "the main object is painted last, on top of the distractors"
            assert 1 <= len(calls) - 1 <= 2
            assert all(d in SEEN_CLASSES and d != main for d in calls[:-1])
    calls.clear()
    draw_photo("sun", 0, distractor_classes=[])
    assert calls == ["sun"]


# ------------------------------------------------------------------------------------------ layout
def test_layout_lists_and_labels(small_root):
    base = small_root / "Sketchy"
    split = base / "zeroshot1"
    seen = [line.split() for line in (split / "cname_cid.txt").read_text().splitlines()]
    unseen = [line.split() for line in (split / "cname_cid_zero.txt").read_text().splitlines()]
    assert seen == [["sun", "0"], ["house", "1"], ["key", "2"]]
    assert unseen == [["kite", "0"], ["tent", "1"]]
    classes = {"train": [c for c, _ in seen], "zero": [c for c, _ in unseen]}
    expected_n = {("sketch", "train"): 3, ("photo", "train"): 2, ("sketch", "zero"): 2, ("photo", "zero"): 2}
    listed = set()
    for fname, (kind, split_name) in LISTS.items():
        lines = (split / fname).read_text().splitlines()
        per_class = {}
        for line in lines:
            rel, label = line.rsplit(" ", 1)
            parts = rel.split("/")
            folder = {"sketch": "256x256/sketch/tx_000000000000_ready",
                      "photo": "256x256/photo/tx_000000000000_ready"}[kind]
            assert "/".join(parts[:-2]) == folder
            cname = parts[-2]
            assert int(label) == classes[split_name].index(cname)  # label = index in the cname file
            assert parts[-1].endswith(".png" if kind == "sketch" else ".jpg")
            assert (base / rel).is_file(), rel
            per_class[cname] = per_class.get(cname, 0) + 1
            listed.add(rel)
        assert per_class == {c: expected_n[(kind, split_name)] for c in classes[split_name]}
    on_disk = {p.relative_to(base).as_posix() for p in base.glob("256x256/*/*/*/*") if p.is_file()}
    assert on_disk == listed  # nothing unlisted, nothing missing
    stamp = json.loads((small_root / "synthetic.json").read_text())
    assert stamp["version"] == synthetic.SYNTHETIC_VERSION and stamp["seed"] == 0 and stamp["size"] == 128
    assert stamp["seen_classes"] == ["sun", "house", "key"] and stamp["unseen_classes"] == ["kite", "tent"]
    assert stamp["num_images"] == {"photo_train": 6, "photo_zero": 4, "sketch_train": 9, "sketch_zero": 4}
    assert not [p for p in small_root.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_written_images(small_root):
    base = small_root / "Sketchy" / "256x256"
    sketches, photos = sorted(base.glob("sketch/*/*/*.png")), sorted(base.glob("photo/*/*/*.jpg"))
    assert len(sketches) == 13 and len(photos) == 10
    for p in sketches:
        img = Image.open(p)
        assert img.format == "PNG" and img.size == (128, 128)
        assert _paper_white(img) > 0.75 and _mid_tone(img) < 0.15 and _ink(img) > 0.003
    for p in photos:
        img = Image.open(p)
        assert img.format == "JPEG" and img.size == (128, 128)
        assert _paper_white(img) < 0.5 and _mid_tone(img) > 0.5


def test_goes_through_the_benchmark_reader(small_root):
    from datasets.benchmarks import load_benchmark

    split = load_benchmark(small_root, "sketchy_extend", "test_class_sketchy25", check_canonical=False)
    assert split.seen_classes == ["sun", "house", "key"] and split.unseen_classes == ["kite", "tent"]
    assert {c: len(v) for c, v in split.train_sketches.items()} == {"sun": 3, "house": 3, "key": 3}
    assert sorted(c for _, c in split.test_photos) == ["kite", "kite", "tent", "tent"]


# ------------------------------------------------------------------------------------------ determinism
def test_generation_is_byte_identical_and_seeded(tmp_path, small_root):
    again = make_synthetic_benchmark(tmp_path / "again", classes=FEW_CLASSES, progress=False, **SMALL)
    assert _tree_bytes(again) == _tree_bytes(small_root)
    # an image depends only on (seed, class, kind, index): a subset with other counts repeats it
    subset = make_synthetic_benchmark(tmp_path / "subset", classes=("key", "tent"), sketches_per_class=1,
                                      photos_per_class=1, unseen_per_class=1, progress=False)
    for rel in ("Sketchy/256x256/sketch/tx_000000000000_ready/key/key_0000.png",
                "Sketchy/256x256/photo/tx_000000000000_ready/tent/tent_0000.jpg"):
        assert (subset / rel).read_bytes() == (small_root / rel).read_bytes()
    other = make_synthetic_benchmark(tmp_path / "other", seed=1, classes=FEW_CLASSES, progress=False, **SMALL)
    a, b = _tree_bytes(other), _tree_bytes(small_root)
    images = [k for k in b if k.endswith((".png", ".jpg"))]
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in images)


# ------------------------------------------------------------------------------------------ caching
def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PUXIM_CACHE", str(tmp_path / "c"))
    assert synthetic.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PUXIM_CACHE")
    assert synthetic.default_cache_dir() == Path.home() / ".cache" / "puxim"


def test_ensure_reuses_and_regenerates(monkeypatch, tmp_path):
    made = []
    real = synthetic.make_synthetic_benchmark

    def counting(root, **kw):
        made.append(kw)
        return real(root, **kw)

    monkeypatch.setattr(synthetic, "make_synthetic_benchmark", counting)
    kw = dict(classes=("sun", "kite"), progress=False, **SMALL)

    root = ensure_synthetic_benchmark(tmp_path, **kw)
    assert root == tmp_path / "synthetic-seed0" and len(made) == 1
    stamp_file = root / "synthetic.json"
    first = stamp_file.stat().st_mtime_ns

    assert ensure_synthetic_benchmark(tmp_path, **kw) == root  # same request: reused
    assert len(made) == 1 and stamp_file.stat().st_mtime_ns == first

    monkeypatch.setenv("PUXIM_CACHE", str(tmp_path))  # the default cache dir
    assert ensure_synthetic_benchmark(**kw) == root and len(made) == 1

    assert ensure_synthetic_benchmark(tmp_path, **{**kw, "photos_per_class": 1}) == root  # counts changed
    assert len(made) == 2
    assert len(list(root.glob("Sketchy/256x256/photo/*/sun/*.jpg"))) == 1

    monkeypatch.setattr(synthetic, "SYNTHETIC_VERSION", synthetic.SYNTHETIC_VERSION + 1)  # drawing changed
    assert ensure_synthetic_benchmark(tmp_path, **kw) == root and len(made) == 3
    assert json.loads(stamp_file.read_text())["version"] == synthetic.SYNTHETIC_VERSION
    assert ensure_synthetic_benchmark(tmp_path, **kw) == root and len(made) == 3

    root1 = ensure_synthetic_benchmark(tmp_path, seed=1, **kw)  # another seed: its own benchmark
    assert root1 == tmp_path / "synthetic-seed1" and len(made) == 4 and made[-1]["seed"] == 1
    assert json.loads((root1 / "synthetic.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic-seed0", "synthetic-seed1"]

    (root / "synthetic.json").write_text("{not json")  # a damaged stamp is redrawn, not trusted
    assert ensure_synthetic_benchmark(tmp_path, **kw) == root and len(made) == 5
    with pytest.raises(TypeError, match="colour"):
        ensure_synthetic_benchmark(tmp_path, colour="red")


def test_interrupted_generation_leaves_the_old_benchmark(monkeypatch, tmp_path):
    kw = dict(classes=("sun", "kite"), progress=False, **SMALL)
    root = make_synthetic_benchmark(tmp_path / "root", **kw)
    before = _tree_bytes(root)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_render_photo", boom)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_benchmark(tmp_path / "root", seed=5, **kw)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_benchmark(tmp_path / "fresh", **kw)
    assert _tree_bytes(root) == before
    assert sorted(os.listdir(tmp_path)) == ["root"]  # no half benchmark, no temp folder


# ------------------------------------------------------------------------------------------ command line
def test_command_line_with_preview(tmp_path):
    out, preview = tmp_path / "bench", tmp_path / "preview.png"
    synthetic.main(["--out", str(out), "--seed", "3", "--sketches_per_class", "1", "--photos_per_class", "1",
                    "--unseen_per_class", "1", "--size", "32", "--preview", str(preview)])
    stamp = json.loads((out / "synthetic.json").read_text())
    assert stamp["seed"] == 3 and stamp["classes"] == list(CLASSES)
    assert len(list(out.glob("Sketchy/256x256/*/*/*/*"))) == 2 * len(CLASSES)
    img = Image.open(preview)
    assert img.height == len(CLASSES) * (96 + 4)  # one row per class
    assert _paper_white(img) < 0.9  # the tiles are there, not a blank page
