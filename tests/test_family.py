"""The procedural benchmark family (datasets.family) and the learning-matrix tool."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.benchmarks import load_benchmark
from datasets.family import FAMILY, FamilySpec, class_glyph, make_family_benchmark
from datasets.filelist import DatasetError
from tools import learning_matrix


def small(name, **kw):
    base = dict(seen=3, unseen=2, per_class=3, sketch_size=48, photo_size=(56, 40))
    base.update(kw)
    return FamilySpec(name, **base)


@pytest.mark.parametrize("layout", ["sketchy", "tuberlin", "quickdraw"])
def test_each_layout_loads_as_a_custom_split(tmp_path, layout):
    spec = small(f"s_{layout}", layout=layout, photo_styles=("textured", "cluttered", "noisy"),
                 sketch_styles=("jittery", "partial"), photo_mode="P", sketch_mode="RGBA")
    make_family_benchmark(tmp_path, spec)
    split = load_benchmark(tmp_path, spec.dataset, spec.test_class, check_canonical=False)
    assert len(split.seen_classes) == 3 and len(split.unseen_classes) == 2
    assert not set(split.seen_classes) & set(split.unseen_classes)
    assert "glyph 04" in split.unseen_classes  # names with a space, as "alarm clock"
    assert sum(len(v) for v in split.train_sketches.values()) == 9
    assert len(split.test_photos) == 6
    photo = Image.open(split.test_photos[0][0])
    sketch = Image.open(split.test_sketches[0][0])
    assert photo.mode == "P" and photo.size == (56, 40)
    assert sketch.mode == "RGBA" and sketch.size == (48, 48)


def test_drawing_is_deterministic_and_seeded(tmp_path):
    spec = small("det", photo_styles=("flat",), sketch_mode="1")
    a, b = make_family_benchmark(tmp_path / "a", spec), make_family_benchmark(tmp_path / "b", spec)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert Image.open(a / files[0]).mode == "1"
    assert class_glyph(0, 3) == class_glyph(0, 3) and class_glyph(0, 3) != class_glyph(1, 3)
    stamp = json.loads((a / "family.json").read_text())
    assert stamp["seen"] == 3 and stamp["photo_size"] == [56, 40]


def test_sketches_are_ink_on_white_and_photos_are_not(tmp_path):
    spec = small("ink", per_class=2)
    make_family_benchmark(tmp_path, spec)
    split = load_benchmark(tmp_path, spec.dataset, spec.test_class, check_canonical=False)
    sketch = np.asarray(Image.open(split.test_sketches[0][0]).convert("L"), np.float32)
    assert (sketch > 250).mean() > 0.6 and (sketch < 100).sum() > 20  # white paper, dark strokes
    photo = np.asarray(Image.open(split.test_photos[0][0]).convert("L"), np.float32)
    assert (photo > 250).mean() < 0.5


def test_bad_spec_is_refused_by_name(tmp_path):
    with pytest.raises(DatasetError, match="'odd'.*unknown style"):
        make_family_benchmark(tmp_path, small("odd", photo_styles=("glossy",)))
    with pytest.raises(DatasetError, match="unknown layout"):
        make_family_benchmark(tmp_path, small("odd2", layout="imagenet"))


def test_single_shape_classes_are_distinct_simple_shapes_and_composites_are_unchanged():
    kinds = [class_glyph(8, k, (1, 1)) for k in range(16)]
    assert all(len(g) == 1 and g[0]["centre"] == (0.0, 0.0) for g in kinds)
    assert len({g[0]["kind"] for g in kinds}) == 16  # a permutation of the 16 outlines
    # Composite glyphs are pinned: docs/results/learning_matrix.md measured benchmarks drawn with them.
    assert [p["kind"] for p in class_glyph(0, 0)] == ["halfdisc", "hexagon", "bar"]
    assert [p["kind"] for p in class_glyph(0, 0, (2, 4))] == ["halfdisc", "hexagon", "bar"]
    with pytest.raises(DatasetError, match="at most 16 classes"):
        small("many", seen=15, unseen=2, parts=(1, 1)).check()
    with pytest.raises(DatasetError, match="parts must be"):
        small("none", parts=(0, 2)).check()


def test_family_spans_the_issue_ranges():
    specs = list(FAMILY.values())
    assert len(specs) >= 8
    assert {s.layout for s in specs} == {"sketchy", "tuberlin", "quickdraw"}
    assert min(s.seen for s in specs) <= 6 and max(s.seen for s in specs) >= 40
    assert min(s.unseen for s in specs) <= 3 and max(s.unseen for s in specs) >= 8
    assert min(s.per_class for s in specs) <= 30 and max(s.per_class for s in specs) >= 100
    assert {st for s in specs for st in s.photo_styles} == {"flat", "textured", "cluttered", "noisy", "lowcontrast"}
    assert {st for s in specs for st in s.sketch_styles} == {"clean", "jittery", "thin", "thick", "partial"}


def test_learning_matrix_runs_cells_and_names_a_failing_one(tmp_path, monkeypatch, capsys):
    cells = {"ok_cell": small("ok_cell", per_class=4), "bad_cell": small("bad_cell", photo_styles=("glossy",))}
    monkeypatch.setattr(learning_matrix, "FAMILY", cells)
    code = learning_matrix.main(["--benchmarks", "ok_cell", "bad_cell", "--seeds", "3", "--data_dir",
                                 str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--train_args",
                                 "--epoch 1 --datasetLen 16 --batch_size 8 --num_workers 0 --device cpu",
                                 "--reference_args", "--steps 3 --batch_size 4"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "bad_cell seed 3 FAILED: drawing the benchmark" in err and "unknown style" in err
    result = json.loads((tmp_path / "out" / "matrix.json").read_text())
    ok = next(c for c in result["cells"] if c["benchmark"] == "ok_cell")
    line = json.loads((tmp_path / "out" / "ok_cell_s3" / "log.txt").read_text().splitlines()[-1])
    assert ok["chance"] == pytest.approx(0.5)  # 2 unseen classes with 4 photos each
    assert ok["mAP_x"] == pytest.approx(line["test_mAP@all"] / 0.5)
    assert ok["P100_x"] == pytest.approx(line["test_P@100"] / 0.5)
    assert ok["triplet_acc"] == pytest.approx(line["train_triplet_acc"])  # the run's own figures
    assert ok["emb_spread"] == pytest.approx(line["train_emb_spread"])
    assert "| ok_cell | 3 |" in out and "1/2 cells finished" in out and "targets NOT met" in out
    # The small-CNN yardstick ran on the same cell, with the same chance level.
    ref = ok["reference"]
    assert ref["steps"] == 3 and ref["chance"] == pytest.approx(0.5)
    assert ref["mAP@all"] == json.loads((tmp_path / "out" / "reference" / "ok_cell_s3.json").read_text())["mAP@all"]
    assert ref["mAP_x"] == pytest.approx(ref["mAP@all"] / 0.5)
    assert f"{ref['mAP@all']:.3f} ({ref['mAP_x']:.2f}x)" in out and "the small-CNN reference reaches" in out
    # --report_only tabulates finished runs again without training; a seed never run is named.
    code = learning_matrix.main(["--benchmarks", "ok_cell", "--seeds", "3", "4", "--out", str(tmp_path / "out"),
                                 "--report_only"])
    again = json.loads((tmp_path / "out" / "matrix.json").read_text())["cells"]
    assert code == 1 and again[0]["mAP_x"] == pytest.approx(ok["mAP_x"])
    assert "no finished run" in again[1]["error"] and "ok_cell_s4" in again[1]["error"]


def test_cnn_reference_standardises_photos_when_asked(tmp_path, monkeypatch):
    """tools.cnn_reference --input_norm photo: every photo (training and gallery) standardised, sketches not."""
    from datasets import build_datasets
    from models.encoder import standardize_images
    from utils.config import make_config
    from tools import cnn_reference

    spec = small("ref_cell", per_class=4)
    root = make_family_benchmark(tmp_path / "data", spec)
    data = build_datasets(make_config("tiny", data_path=str(root), dataset=spec.dataset, test_class=spec.test_class,
                                      custom_split=True, image_size=32, seed=0, datasetLen=1, no_progress=True))
    seen = []
    real_load_all = cnn_reference._load_all

    def spy(paths, preprocess, size, desc, progress, standardize=False):
        out = real_load_all(paths, preprocess, size, desc, progress, standardize)
        seen.append((preprocess.__name__, out, real_load_all(paths, preprocess, size, desc, progress)))
        return out

    monkeypatch.setattr(cnn_reference, "_load_all", spy)
    result = cnn_reference.train_reference(data, steps=2, batch_size=4, image_size=32, input_norm="photo")
    assert result["input_norm"] == "photo" and result["steps"] == 2
    assert result["chance"] == pytest.approx(0.5)  # evaluated on the 2 unseen classes, 4 photos each
    photos = [(out, raw) for name, out, raw in seen if name == "preprocess_photo"]
    sketches = [(out, raw) for name, out, raw in seen if name == "preprocess_sketch"]
    assert len(photos) == 3 + 1 and len(sketches) == 3 + 1  # 3 seen classes, then the gallery / the queries
    for out, raw in photos:
        torch.testing.assert_close(out, standardize_images(raw))
        torch.testing.assert_close(out.mean(dim=(2, 3)), torch.zeros(out.shape[:2]), rtol=0, atol=1e-5)
    assert all(torch.equal(out, raw) for out, raw in sketches)
    with pytest.raises(ValueError, match="input_norm must be one of"):
        cnn_reference.train_reference(data, steps=1, input_norm="all")
