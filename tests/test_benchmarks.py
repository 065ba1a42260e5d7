"""datasets.benchmarks and datasets.build_datasets on small split folders made in tmp_path."""
from pathlib import Path

import pytest

import datasets
from datasets import build_datasets
from datasets.benchmarks import DATASETS, find_missing_files, load_benchmark
from datasets.filelist import DatasetError, read_class_names
from conftest import SKETCHY_EXTENDED, SKETCHY_PHOTOS, SKETCHY_SKETCHES  # tests/ is on sys.path
from utils.config import make_config

SPLITS = Path(datasets.__file__).parent / "splits"
SKETCHY25 = read_class_names(SPLITS / "test_class_sketchy25.txt")
SEEN = ["alarm clock", "café crème", "pig"]  # spaces and unicode in class names
SK_DIR, PH_DIR, EXT_DIR = SKETCHY_SKETCHES, SKETCHY_PHOTOS, SKETCHY_EXTENDED


# This module's split: tiny white images, 2 sketches and 3 photos per class (photo 1 in the extended folder).
SPLIT = dict(seen=SEEN, unseen=SKETCHY25, per_class=(2, 3), images="blank", size=8)
ZEROSHOT1 = "Sketchy/zeroshot1"  # test_class_sketchy25's split folder


def test_load_sketchy25(tmp_path, make_benchmark):
    make_benchmark(root=tmp_path, **SPLIT)
    split = load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25")
    assert split.root == tmp_path / "Sketchy" and split.split_dir == tmp_path / "Sketchy/zeroshot1"
    assert split.seen_classes == SEEN and split.unseen_classes == SKETCHY25
    assert split.summary() == {
        "name": "sketchy_extend/test_class_sketchy25", "root": str(tmp_path / "Sketchy"),
        "seen_classes": 3, "unseen_classes": 25, "train_sketches": 6, "train_photos": 9,
        "test_sketches": 50, "test_photos": 75}
    assert split.train_sketches["café crème"] == [
        tmp_path / f"Sketchy/{SK_DIR}/café crème/s {j}.png" for j in range(2)]
    assert split.train_photos["pig"][1] == tmp_path / f"Sketchy/{EXT_DIR}/pig/p 1.jpg"
    assert split.test_sketches[0] == (tmp_path / f"Sketchy/{SK_DIR}/cup/zs 0.png", "cup")
    assert all(p.is_absolute() and p.is_file() for p, _ in split.test_photos)


@pytest.mark.parametrize("dataset,test_class,split_dir,lists", [
    ("sketchy_extend", "test_class_sketchy21", "Sketchy/zeroshot0", None),
    ("tu_berlin", "test_class_tuberlin30", "TUBerlin/zeroshot", "tu_berlin"),
    ("quickdraw", None, "QuickDraw/zeroshot", "Quickdraw"),  # case-insensitive, default split
])
def test_other_benchmarks(tmp_path, make_benchmark, dataset, test_class, split_dir, lists):
    key = lists or "sketchy_extend"
    spec = next(iter(DATASETS[key].values())) if lists else DATASETS[key][test_class]
    canonical = read_class_names(SPLITS / f"{spec.canonical}.txt")
    layout = {"sketchy_extend": "sketchy", "tu_berlin": "tuberlin", "quickdraw": "quickdraw"}[dataset]
    make_benchmark(layout, root=tmp_path, **dict(SPLIT, unseen=canonical), test_class=test_class or spec.canonical)
    split = load_benchmark(tmp_path, dataset, test_class)
    assert split.split_dir == tmp_path / split_dir
    assert sorted(split.unseen_classes) == sorted(canonical)
    assert split.summary()["test_sketches"] == 2 * len(canonical)


def test_canonical_mismatch_lists_differences(tmp_path, make_benchmark):
    unseen = [c for c in SKETCHY25 if c != "cup"] + ["mug"]
    make_benchmark(root=tmp_path, **dict(SPLIT, unseen=unseen))
    with pytest.raises(DatasetError) as info:
        load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25")
    msg = str(info.value)
    assert "cname_cid_zero.txt" in msg and "['mug']" in msg and "['cup']" in msg
    split = load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25", check_canonical=False)
    assert "mug" in split.unseen_classes
    # Order does not matter for the canonical check.
    make_benchmark(root=tmp_path / "b", **dict(SPLIT, unseen=SKETCHY25[::-1]))
    assert load_benchmark(tmp_path / "b", "sketchy_extend", "test_class_sketchy25").unseen_classes \
        == SKETCHY25[::-1]


def test_missing_root_dataset_split_and_list(tmp_path, make_benchmark):
    with pytest.raises(DatasetError, match="data root not found"):
        load_benchmark(tmp_path / "nowhere", "sketchy_extend", "test_class_sketchy25")
    (tmp_path / "zeroshot1").mkdir()
    with pytest.raises(DatasetError, match="Sketchy folder itself"):  # --data_path one level too deep
        load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25")
    (tmp_path / "Sketchy").mkdir()
    with pytest.raises(DatasetError, match="split folder not found.*datasets.prepare"):
        load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25")
    folder = make_benchmark(root=tmp_path, **SPLIT) / ZEROSHOT1
    (folder / "all_photo_filelist_train.txt").unlink()
    with pytest.raises(DatasetError, match="all_photo_filelist_train.txt: file list not found"):
        load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25")
    with pytest.raises(DatasetError, match="unknown --dataset"):
        load_benchmark(tmp_path, "sketchy", "test_class_sketchy25")
    with pytest.raises(DatasetError, match="unknown --test_class"):
        load_benchmark(tmp_path, "tu_berlin", "test_class_sketchy25")


def test_missing_files_found_before_training(tmp_path, make_benchmark):
    make_benchmark(root=tmp_path, **SPLIT)
    gone = [tmp_path / f"Sketchy/{SK_DIR}/pig/s 1.png", tmp_path / f"Sketchy/{PH_DIR}/cup/zp 0.jpg",
            tmp_path / f"Sketchy/{EXT_DIR}/bell/zp 1.jpg"]
    for p in gone:
        p.unlink()
    with pytest.raises(DatasetError) as info:
        load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25")
    msg = str(info.value)
    assert "3 of 140 files" in msg and all(str(p) in msg for p in gone)
    load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25", check_files=False)


def test_find_missing_files_whole_folder_and_limit(tmp_path):
    (tmp_path / "a").mkdir()
    present = [tmp_path / "a" / f"{i}.png" for i in range(5)]
    for p in present:
        p.write_bytes(b"x")
    absent = [tmp_path / "a" / "x.png", tmp_path / "no_folder" / "y.png", tmp_path / "no_folder" / "z.png"]
    assert sorted(find_missing_files(present + absent)) == sorted(absent)
    assert len(find_missing_files(present + absent, limit=2)) == 2
    assert find_missing_files(present) == []


def test_empty_and_absent_classes(tmp_path, make_benchmark):
    folder = make_benchmark(root=tmp_path, **SPLIT) / ZEROSHOT1
    # A seen class of cname_cid.txt without any sketch in the train list.
    lst = folder / "sketch_tx_000000000000_ready_filelist_train.txt"
    lst.write_text("".join(l + "\n" for l in lst.read_text().splitlines() if "/pig/" not in l))
    with pytest.raises(DatasetError, match=r"sketch_tx_000000000000_ready_filelist_train.txt: 1 seen "
                                           r"classes have no sketches: \['pig'\]"):
        load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25")
    # An unseen class absent from the unseen photo list.
    folder = make_benchmark(root=tmp_path / "b", **SPLIT) / ZEROSHOT1
    lst = folder / "all_photo_filelist_zero.txt"
    lst.write_text("".join(l + "\n" for l in lst.read_text().splitlines() if "/swan/" not in l))
    with pytest.raises(DatasetError, match=r"unseen classes have no photos: \['swan'\]"):
        load_benchmark(tmp_path / "b", "sketchy_extend", "test_class_sketchy25")


def test_list_class_not_in_class_file(tmp_path, make_benchmark):
    folder = make_benchmark(root=tmp_path, **SPLIT) / ZEROSHOT1
    with open(folder / "all_photo_filelist_zero.txt", "a") as f:
        f.write(f"{PH_DIR}/pig/x.png 0\n")  # a seen class in the unseen list
    with pytest.raises(DatasetError, match=r"all_photo_filelist_zero.txt, line 76: class folder 'pig'"):
        load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25")


def test_seen_unseen_overlap_is_an_error(tmp_path, make_benchmark):
    make_benchmark(root=tmp_path, **dict(SPLIT, seen=SEEN + ["cup"]))
    with pytest.raises(DatasetError, match=r"classes in both .*\['cup'\].*disjoint"):
        load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25")


def test_files_in_training_and_test_lists_are_refused(tmp_path, make_benchmark):
    folder = make_benchmark(root=tmp_path, **SPLIT) / ZEROSHOT1
    shared = f"{SK_DIR}/cup/zs 1.png"
    with open(folder / "sketch_tx_000000000000_ready_filelist_train.txt", "a") as f:
        f.write(f"{shared} 3\n")  # a test sketch listed for training, under a label of its own
    with pytest.raises(DatasetError) as info:
        load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchy25")
    msg = str(info.value)
    assert ("1 files are in both sketch_tx_000000000000_ready_filelist_train.txt (training) and "
            f"sketch_tx_000000000000_ready_filelist_zero.txt (test), e.g.\n  {shared}\n") in msg
    assert (f"python -m datasets.prepare --root {tmp_path} --dataset sketchy_extend --test_class "
            "test_class_sketchy25 --force") in msg and "remove those lines" in msg
    # Under a label the list already uses for another class, and with Windows separators: the same file.
    folder = make_benchmark(root=tmp_path / "b", **SPLIT) / ZEROSHOT1
    with open(folder / "all_photo_filelist_train.txt", "a") as f:
        f.write(f"{PH_DIR}/swan/zp 0.jpg 0\n".replace("/", "\\"))
    with pytest.raises(DatasetError, match=rf"1 files are in both all_photo_filelist_train.txt \(training\) and "
                                           rf"all_photo_filelist_zero.txt \(test\), e.g.\n  {PH_DIR}/swan/zp 0.jpg"):
        load_benchmark(tmp_path / "b", "sketchy_extend", "test_class_sketchy25")


def test_sketchy_am_backslash_lists_leave_test_classes_out(tmp_path, make_benchmark, caplog):
    # Sketchy-AM lists as released: zeroshot2, photos under ambiguity\<class>\ (Windows separators), and
    # training classes that are test classes (cup, swan), here with their sketches, some of them test sketches.
    am_seen = ["ant", "car_(sedan)", "cup", "swan"]
    folder = make_benchmark(root=tmp_path, **dict(SPLIT, seen=am_seen), test_class="test_class_sketchyam",
                            backslash=True) / "Sketchy/zeroshot2"
    with open(folder / "sketch_tx_000000000000_ready_filelist_train.txt", "a") as f:
        f.write(f"{SK_DIR}/cup/zs 0.png 2\n")
    for test_class in ("test_class_sketchyam", None):
        caplog.clear()
        with caplog.at_level("WARNING", logger="datasets"):
            split = load_benchmark(tmp_path, "sketchy_am", test_class)
        [record] = caplog.records
        assert record.name.startswith("datasets") and record.levelname == "WARNING"
        assert record.getMessage().endswith(
            "2 training classes of cname_cid.txt are test classes of cname_cid_zero.txt, and zero-shot forbids any "
            "test class in training: they are left out of training (5 training sketches and 6 training photos left "
            "out, 2 training classes kept): cup, swan")
        assert split.split_dir == tmp_path / "Sketchy/zeroshot2" and split.seen_classes == ["ant", "car_(sedan)"]
        assert set(split.train_sketches) == set(split.train_photos) == {"ant", "car_(sedan)"}
        assert split.train_photos["car_(sedan)"][0] == tmp_path / "Sketchy/ambiguity/car_(sedan)/p 0.jpg"
        train = {p for files in [*split.train_sketches.values(), *split.train_photos.values()] for p in files}
        test = {p for p, _ in split.test_sketches + split.test_photos}
        assert len(train) == 10 and len(test) == 125 and not train & test
        assert not set(split.seen_classes) & set(split.unseen_classes)
        assert {c for _, c in split.test_sketches} == set(SKETCHY25)
    with caplog.at_level("WARNING", logger="datasets"):
        load_benchmark(tmp_path, "sketchy_extend", "test_class_sketchyam")
    assert "cup, swan" in caplog.text
    with pytest.raises(DatasetError, match="sketchy_am takes"):
        load_benchmark(tmp_path, "sketchy_am", "test_class_sketchy21")
    # Only Sketchy-AM leaves test classes out: elsewhere they are an error (test_seen_unseen_overlap_is_an_error).


# ----------------------------------------------------------------------- build_datasets

def test_build_datasets_real_layout(tmp_path, make_benchmark):
    make_benchmark(root=tmp_path, **dict(SPLIT, per_class=(40, 20)))
    args = make_config("b16", data_path=str(tmp_path), dataset="sketchy_extend", test_class="test_class_sketchy25",
                       image_size=32, datasetLen=7, seed=3)
    out = build_datasets(args)
    assert set(out) == {"split", "train", "query", "gallery", "class_to_idx"}
    assert out["class_to_idx"] == {c: i for i, c in enumerate(sorted(SKETCHY25))}
    assert len(out["train"]) == 7 and out["train"].image_size == 32 and out["train"].seed == 3
    assert len(out["query"]) == 25 * 40 and len(out["gallery"]) == 25 * 20  # testall default
    item = out["query"][41]
    assert item["image"].shape == (3, 32, 32) and item["path"].endswith("swan/zs 1.png")
    assert item["label"] == out["class_to_idx"]["swan"] and item["index"] == 41
    # testall=False: the released code's quick strides (Sketchy: every 20th sketch, 10th photo).
    quick = build_datasets(args.replace(testall=False))
    assert len(quick["query"]) == len(range(0, 1000, 20)) and len(quick["gallery"]) == 50
    # eval_per_class: at most n per class, reproducibly.
    sub = build_datasets(args.replace(eval_per_class=3))
    labels = sub["query"].labels.tolist()
    assert len(labels) == 75 and all(labels.count(i) == 3 for i in range(25))
    again = build_datasets(args.replace(eval_per_class=3))
    assert sub["query"].items == again["query"].items and sub["gallery"].items == again["gallery"].items


def test_build_datasets_synthetic_default(tmp_path, make_benchmark, monkeypatch):
    """Without data_path: ensure_synthetic_benchmark(synthetic_dir), no canonical check."""
    import datasets.synthetic as synthetic

    calls, bars = [], []
    synth = make_benchmark(root=tmp_path / "synth", **dict(SPLIT, unseen=["sun", "moon"], seen=["cup", "car"]))

    def fake_ensure(cache_dir=None, progress=True, **kw):
        calls.append(cache_dir)
        bars.append(progress)
        return synth

    monkeypatch.setattr(synthetic, "ensure_synthetic_benchmark", fake_ensure)
    out = build_datasets(make_config("b16", synthetic_dir=str(tmp_path / "cache")))
    assert calls == [str(tmp_path / "cache")]
    assert out["class_to_idx"] == {"moon": 0, "sun": 1} and len(out["train"]) == 5000
    out = build_datasets(make_config("b16"))
    assert calls[-1] is None and out["split"].name == "sketchy_extend/test_class_sketchy25"
    build_datasets(make_config("b16", no_progress=True))  # train.py --no_progress: no drawing bar
    assert bars == [True, True, False]


@pytest.mark.parametrize("make", ["nothing", "root only", "dataset folder"])
def test_a_missing_root_stops_train_py_before_its_experiment_folder(tmp_path, caplog, make):
    """A mistyped --data_path, or one without the dataset or split folder: one line, exit 2, no results/EXP."""
    import train
    from conftest import train_args

    root = tmp_path / "data"
    if make != "nothing":
        (root / ("Sketchy" if make == "dataset folder" else "")).mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(root, tmp_path / "results", "typo", custom_split=False))
    assert exit_info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "not found" in errors[0], errors
    assert not (tmp_path / "results").exists()
