"""python -m datasets.prepare: building split lists from raw folders and checking a root."""
import shutil
from pathlib import Path

import pytest
from PIL import Image

import datasets
from datasets import prepare
from datasets.benchmarks import load_benchmark
from datasets.filelist import DatasetError, read_class_file, read_class_names, read_file_list
from conftest import SKETCHY_EXTENDED, SKETCHY_PHOTOS, SKETCHY_SKETCHES  # tests/ is on sys.path

SPLITS = Path(datasets.__file__).parent / "splits"
SKETCHY25 = read_class_names(SPLITS / "test_class_sketchy25.txt")
SEEN = ["alarm clock", "café", "pig"]
SK, PH, EXT = SKETCHY_SKETCHES, SKETCHY_PHOTOS, SKETCHY_EXTENDED
# Raw image folders as datasets.prepare reads them (no lists): tiny white images "img <i>", and in every class
# folder a hidden file and a text file that prepare must skip.
RAW = dict(lists=False, images="blank", size=8, name="img {i}")


@pytest.fixture
def sketchy_root(tmp_path, make_benchmark):
    """Raw Sketchy folders: SEEN + the 25 test classes, 3 sketches and 3 photos per class (photo 1 extended)."""
    return make_benchmark(root=tmp_path, seen=SEEN, unseen=SKETCHY25, per_class=3, **RAW)


def run(argv, capsys):
    code = prepare.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_build_sketchy25_lists(sketchy_root, capsys):
    code, out = run(["--root", sketchy_root, "--dataset", "sketchy_extend",
                     "--test_class", "test_class_sketchy25"], capsys)
    assert code == 0, out
    split = sketchy_root / "Sketchy/zeroshot1"
    assert (split / "cname_cid.txt").read_text() == "alarm clock 0\ncafé 1\npig 2\n"
    assert read_class_file(split / "cname_cid_zero.txt") == SKETCHY25  # canonical order
    sketches = (split / "sketch_tx_000000000000_ready_filelist_train.txt").read_text().splitlines()
    assert sketches[:4] == [f"{SK}/alarm clock/img 0.png 0", f"{SK}/alarm clock/img 1.png 0",
                            f"{SK}/alarm clock/img 2.png 0", f"{SK}/café/img 0.png 1"]
    photos = read_file_list(split / "all_photo_filelist_zero.txt", SKETCHY25)
    assert photos[:3] == [(f"{PH}/cup/img 0.jpg", "cup"), (f"{PH}/cup/img 2.jpg", "cup"),
                          (f"{EXT}/cup/img 1.jpg", "cup")]
    summary = load_benchmark(sketchy_root, "sketchy_extend", "test_class_sketchy25").summary()
    assert (summary["train_sketches"], summary["train_photos"]) == (9, 9)
    assert (summary["test_sketches"], summary["test_photos"]) == (75, 75)
    # Existing lists are kept unless --force.
    code, out = run(["--root", sketchy_root, "--dataset", "sketchy_extend"], capsys)
    assert code == 1 and "--force" in out
    code, out = run(["--root", sketchy_root, "--dataset", "sketchy_extend", "--force"], capsys)
    assert code == 0 and "wrote" in out


def test_check_reports_counts_missing_and_unreadable(sketchy_root, capsys, monkeypatch):
    assert run(["--root", sketchy_root, "--dataset", "sketchy_extend"], capsys)[0] == 0
    check = ["--check", sketchy_root, "--dataset", "sketchy_extend", "--test_class", "test_class_sketchy25"]
    # Against the published counts this tiny root is wrong on every list.
    code, out = run(check, capsys)
    assert code == 1
    line = next(l for l in out.splitlines() if "sketch_tx_000000000000_ready_filelist_train" in l)
    assert line.split()[1:] == ["9", "sketch_train", "PROBLEM:", "published", "count", "is", "55252"]
    assert "published count is 17101" in out and "published count is 100" in out
    # With the expected counts of this root, everything is fine.
    monkeypatch.setitem(prepare.EXPECTED_COUNTS, ("sketchy_extend", "test_class_sketchy25"), dict(
        seen_classes=3, unseen_classes=25, sketch_train=9, photo_train=9, sketch_zero=75,
        photo_zero=75))
    code, out = run(check, capsys)
    assert code == 0 and "PROBLEM" not in out and out.count(" ok") == 6
    # A missing file is found and named.
    gone = sketchy_root / "Sketchy" / EXT / "swan" / "img 1.jpg"
    good = gone.read_bytes()
    gone.unlink()
    code, out = run(check, capsys)
    assert code == 1 and "1 of 75 listed files are missing" in out and str(gone) in out
    # --verify_images opens every image: a zero-byte one is reported.
    gone.write_bytes(good)
    broken = sketchy_root / "Sketchy" / SK / "pig" / "img 2.png"
    broken.write_bytes(b"")
    code, out = run(check, capsys)
    assert code == 0
    code, out = run(check + ["--verify_images"], capsys)
    assert code == 1 and "1 unreadable images" in out and str(broken) in out


def test_check_reports_class_mismatch(sketchy_root, capsys, monkeypatch):
    assert run(["--root", sketchy_root, "--dataset", "sketchy_extend"], capsys)[0] == 0
    split = sketchy_root / "Sketchy/zeroshot1"
    (split / "cname_cid.txt").write_text("alarm clock 0\npig 1\nzebra 2\n")
    zero = split / "cname_cid_zero.txt"
    zero.write_text(zero.read_text().replace("cup 0", "mug 0"))
    code, out = run(["--check", sketchy_root, "--dataset", "sketchy_extend"], capsys)
    assert code == 1
    assert "classes not in its class file: ['café']" in out
    assert "classes of its class file have no files: ['zebra']" in out
    assert "not canonical ['mug']; canonical but missing ['cup']" in out
    code, out = run(["--check", sketchy_root / "nowhere", "--dataset", "sketchy_extend"], capsys)
    assert code == 1 and "data root not found" in out


@pytest.mark.parametrize("dataset,dirs,split,lists", [
    ("tu_berlin", ("png_ready", "ImageResized_ready"), "TUBerlin/zeroshot",
     ("png_ready_filelist_train.txt", "ImageResized_ready_filelist_zero.txt")),
    ("Quickdraw", ("sketches", "images"), "QuickDraw/zeroshot",
     ("sketch_train.txt", "all_photo_zero.txt")),
])
def test_build_tu_berlin_and_quickdraw(tmp_path, make_benchmark, capsys, dataset, dirs, split, lists):
    spec_name = {"tu_berlin": "test_class_tuberlin30", "Quickdraw": "test_class_quickdraw30"}[dataset]
    unseen = read_class_names(SPLITS / f"{spec_name}.txt")
    layout = {"tu_berlin": "tuberlin", "Quickdraw": "quickdraw"}[dataset]
    make_benchmark(layout, root=tmp_path, seen=["alarm clock", "wrist-watch"], unseen=unseen, per_class=(2, 1), **RAW)
    code, out = run(["--root", tmp_path, "--dataset", dataset], capsys)
    assert code == 0, out
    assert read_file_list(tmp_path / split / lists[0])[:2] == [
        (f"{dirs[0]}/alarm clock/img 0.png", "alarm clock"),
        (f"{dirs[0]}/alarm clock/img 1.png", "alarm clock")]
    assert len(read_file_list(tmp_path / split / lists[1])) == 30
    assert load_benchmark(tmp_path, dataset, spec_name).summary()["test_sketches"] == 60


AM_TEST_CLASSES = ["cup", "harp", "pineapple", "ray", "rifle", "snail", "squirrel", "swan", "volcano"]


def test_build_sketchy_am(sketchy_root, make_benchmark, capsys, caplog):
    """The released AM classes include 9 test classes: the build leaves them out of training and says so."""
    am = ["ant", "car_(sedan)"] + AM_TEST_CLASSES
    # AM's training folders beside the Sketchy ones: 2 photos per class under ambiguity/, a sketch of each
    # (the test classes' sketch "img 0" is already there)
    make_benchmark(root=sketchy_root, test_class="test_class_sketchyam", seen=am, unseen=[], per_class=(1, 2), **RAW)
    shutil.copy(sketchy_root / "Sketchy/ambiguity/cup/img 0.jpg", sketchy_root / "Sketchy/ambiguity/cup/img 2.jpg")
    # 3 cup photos
    code, out = run(["--root", sketchy_root, "--dataset", "sketchy_am"], capsys)
    assert code == 0, out
    assert ("note: 9 training classes under ambiguity/ are test classes of test_class_sketchyam and are left out "
            "of training (zero-shot): cup (3 photos), harp (2 photos), pineapple (2 photos), ray (2 photos), rifle "
            "(2 photos), snail (2 photos), squirrel (2 photos), swan (2 photos), volcano (2 photos); 19 photos in "
            "all.") in out
    split = sketchy_root / "Sketchy/zeroshot2"
    assert read_class_file(split / "cname_cid.txt") == ["ant", "car_(sedan)"]
    photos = read_file_list(split / "all_photo_filelist_train.txt")
    assert photos == [(f"ambiguity/{c}/img {i}.jpg", c) for c in am[:2] for i in range(2)]
    sketches = read_file_list(split / "sketch_tx_000000000000_ready_filelist_train.txt")
    assert sketches == [(f"{SK}/ant/img 0.png", "ant"), (f"{SK}/car_(sedan)/img 0.png", "car_(sedan)")]
    assert read_class_file(split / "cname_cid_zero.txt") == SKETCHY25
    test_paths = {rel for name in ("sketch_tx_000000000000_ready_filelist_zero.txt", "all_photo_filelist_zero.txt")
                  for rel, _ in read_file_list(split / name)}
    assert len(test_paths) == 25 * 3 + 25 * 3 and not test_paths & {rel for rel, _ in photos + sketches}
    with caplog.at_level("WARNING"):
        loaded = load_benchmark(sketchy_root, "sketchy_am", None)
    assert not caplog.records  # nothing to leave out
    assert loaded.seen_classes == ["ant", "car_(sedan)"] and not set(loaded.seen_classes) & set(loaded.unseen_classes)
    summary = loaded.summary()
    assert (summary["train_sketches"], summary["train_photos"], summary["test_photos"]) == (2, 4, 75)
    code, out = run(["--check", sketchy_root, "--dataset", "sketchy_am"], capsys)
    line = next(l for l in out.splitlines() if "cname_cid.txt" in l)  # the classes training keeps
    assert line.split()[1:] == ["2", "seen_classes", "PROBLEM:", "published", "count", "is", "41"]
    assert "files are in both" not in out and "left out" not in out


def test_check_sketchy_am_with_test_class_files(tmp_path, make_benchmark, capsys):
    """An AM root whose training lists hold a test class, and the test files themselves (as the old build
    wrote them): the class is a note, the shared files are a problem naming them and the fix."""
    # seen ant and cup (a test class) with one sketch and one photo (under ambiguity\, Windows separators), the
    # 25 test classes with one of each: cup's training sketch "img 0" is its test sketch
    make_benchmark(root=tmp_path, test_class="test_class_sketchyam", seen=["ant", "cup"], unseen=SKETCHY25,
                   per_class=1, **dict(RAW, lists=True, junk=True), backslash=("photo_train",))
    code, out = run(["--check", tmp_path, "--dataset", "sketchy_am"], capsys)
    assert code == 1
    assert "note: 1 classes of cname_cid.txt are also test classes and will be left out of training" in out
    assert (f"PROBLEM: 1 files are in both sketch_tx_000000000000_ready_filelist_train.txt (training) and "
            f"sketch_tx_000000000000_ready_filelist_zero.txt (test), e.g. {SK}/cup/img 0.png; zero-shot retrieval "
            f"must not train on test files: rebuild the lists with `python -m datasets.prepare --root {tmp_path} "
            f"--dataset sketchy_am --force`, or remove those lines from "
            f"sketch_tx_000000000000_ready_filelist_train.txt") in out
    # Training leaves the class out, with its files: nothing of the test split is trained on.
    loaded = load_benchmark(tmp_path, "sketchy_am", None)
    assert loaded.seen_classes == ["ant"] and loaded.summary()["train_sketches"] == 1
    # The rebuild the message names fixes it.
    assert run(["--root", tmp_path, "--dataset", "sketchy_am", "--force"], capsys)[0] == 0
    code, out = run(["--check", tmp_path, "--dataset", "sketchy_am"], capsys)
    assert "files are in both" not in out and "left out of training" not in out


def test_check_reports_files_in_training_and_test_lists(sketchy_root, capsys):
    """Any benchmark: a file listed for training and for testing is a problem naming it and the fix."""
    assert run(["--root", sketchy_root, "--dataset", "sketchy_extend"], capsys)[0] == 0
    check = ["--check", sketchy_root, "--dataset", "sketchy_extend", "--custom_split"]  # no published counts
    assert run(check, capsys)[0] == 0
    split = sketchy_root / "Sketchy/zeroshot1"
    shared = f"{EXT}/swan/img 1.jpg"
    with open(split / "all_photo_filelist_train.txt", "a") as f:
        f.write(f"{shared} 3\n")
    code, out = run(check, capsys)
    assert code == 1
    assert (f"PROBLEM: 1 files are in both all_photo_filelist_train.txt (training) and all_photo_filelist_zero.txt "
            f"(test), e.g. {shared}; zero-shot retrieval must not train on test files: rebuild the lists with "
            f"`python -m datasets.prepare --root {sketchy_root} --dataset sketchy_extend --test_class "
            f"test_class_sketchy25 --force`, or remove those lines from all_photo_filelist_train.txt") in out
    with pytest.raises(DatasetError, match="1 files are in both all_photo_filelist_train.txt"):
        load_benchmark(sketchy_root, "sketchy_extend", "test_class_sketchy25")


def test_build_errors(tmp_path, make_benchmark, capsys):
    code, out = run(["--root", tmp_path, "--dataset", "sketchy_extend"], capsys)
    assert code == 1 and "neither" in out
    make_benchmark(root=tmp_path, seen=SEEN, unseen=SKETCHY25, per_class=1, **RAW)
    shutil.rmtree(tmp_path / "Sketchy" / PH / "swan")  # a test class without photos
    code, out = run(["--root", tmp_path, "--dataset", "sketchy_extend"], capsys)
    assert code == 1 and "['swan']" in out and "no photos" in out
    assert not (tmp_path / "Sketchy/zeroshot1").exists()  # nothing written on error


def test_check_a_custom_split_and_a_missing_root(tmp_path, make_benchmark, capsys):
    """--custom_split checks a split of one's own (here the synthetic one) without the canonical classes or
    the published counts; a missing root says so instead of 'split folder not found'."""
    root = make_benchmark(root=tmp_path / "bench", seen=["sun", "moon", "star"], unseen=["candle"], per_class=2,
                          size=32)
    assert prepare.main(["--check", str(root), "--dataset", "sketchy_extend", "--verify_images"]) == 1  # not canonical
    assert "not canonical" in capsys.readouterr().out
    assert prepare.main(["--check", str(root), "--dataset", "sketchy_extend", "--custom_split",
                         "--verify_images"]) == 0
    out = capsys.readouterr().out
    assert "custom split" in out and "OK:" in out and "PROBLEM" not in out
    blank = sorted((root / "Sketchy").rglob("sketch/**/sun_*.png"))[0]
    Image.new("RGB", (32, 32), "white").save(blank)  # readable, but nothing drawn
    assert prepare.main(["--check", str(root), "--dataset", "sketchy_extend", "--custom_split",
                         "--verify_images"]) == 0  # a note, not a problem
    assert f"1 blank sketches (no pixel with R+G+B <= 300), e.g. {blank}" in capsys.readouterr().out
    assert prepare.main(["--check", str(tmp_path / "nowhere"), "--dataset", "sketchy_extend"]) == 1
    assert "data root not found" in capsys.readouterr().out


def test_missing_only_completes_a_released_split_and_keeps_its_lists(tmp_path, make_benchmark, capsys):
    """TU-Berlin as ZSE-SBIR ships it: no photo training list. --missing_only writes it, keeps the rest."""
    unseen = read_class_names(SPLITS / "test_class_tuberlin30.txt")
    make_benchmark("tuberlin", root=tmp_path, seen=["alarm clock", "wrist-watch"], unseen=unseen, per_class=(2, 1),
                   **RAW)
    assert run(["--root", tmp_path, "--dataset", "tu_berlin"], capsys)[0] == 0
    split = tmp_path / "TUBerlin" / "zeroshot"
    released = {p.name: p.read_bytes() for p in split.iterdir()}
    (split / "ImageResized_ready_filelist_train.txt").unlink()
    code, out = run(["--root", tmp_path, "--dataset", "tu_berlin"], capsys)
    assert code == 1 and "--missing_only" in out
    code, out = run(["--root", tmp_path, "--dataset", "tu_berlin", "--missing_only"], capsys)
    assert code == 0 and out.count("wrote ") == 1 and "ImageResized_ready_filelist_train.txt" in out
    assert {p.name: p.read_bytes() for p in split.iterdir()} == released  # the same lists as a full build
    # A class file that disagrees with the folders is not completed around.
    (split / "ImageResized_ready_filelist_train.txt").unlink()
    (split / "cname_cid.txt").write_text("alarm clock 0\nzebra 1\n")
    code, out = run(["--root", tmp_path, "--dataset", "tu_berlin", "--missing_only"], capsys)
    assert code == 1 and "other seen classes than the folders" in out and "zebra" in out
