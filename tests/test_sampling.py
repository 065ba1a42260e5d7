"""datasets.sampling: triplet draws, the distributed index sampler and evaluation sets."""
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.filelist import DatasetError
from datasets.sampling import (
    ImageListDataset, PseudoSketches, RandomCropFlips, TripletDataset, TripletIndexSampler, subsample_per_class,
)
from datasets.transforms import ImageLoadError, load_image, preprocess_photo, preprocess_sketch

SKETCH_COUNTS = {"a": 1, "b": 2, "c": 5, "d": 10, "e": 3, "sketch only": 4}
PHOTO_COUNTS = {"a": 4, "b": 1, "c": 2, "d": 6, "e": 3, "photo only": 5}


def fake_paths(counts, kind):
    return {c: [Path(f"/data/{kind}/{c}/{i}.png") for i in range(n)] for c, n in counts.items()}


def make_dataset(seed=0, length=100, order=None):
    sketches, photos = fake_paths(SKETCH_COUNTS, "sketch"), fake_paths(PHOTO_COUNTS, "photo")
    if order is not None:  # dict insertion order must not matter
        sketches = {c: sketches[c] for c in order if c in sketches}
        photos = {c: photos[c] for c in order if c in photos}
    return TripletDataset(sketches=sketches, photos=photos, length=length, image_size=16, seed=seed)


def chi_square(counts: Counter, keys) -> float:
    total = sum(counts[k] for k in keys)
    expected = total / len(keys)
    return sum((counts[k] - expected) ** 2 / expected for k in keys)


@pytest.fixture(scope="module")
def draws():
    ds = make_dataset()
    return ds, [ds.describe(k) for k in range(12_000)]


def test_class_balance_and_negative_choice(draws):
    ds, items = draws
    anchors = ["a", "b", "c", "d", "e"]  # classes with both sketches and photos
    assert ds.classes == anchors and ds.negative_pool == ["a", "b", "c", "d", "e", "photo only"]
    # Labels index label_names (the photo classes): the seen-class loss's targets.
    assert ds.label_names == ds.negative_pool
    assert all(ds.label_names[t["positive_label"]] == t["positive_class"]
               and ds.label_names[t["negative_label"]] == t["negative_class"] for t in items)
    anchor_counts = Counter(t["positive_class"] for t in items)
    assert set(anchor_counts) == set(anchors)
    # df = 4; the 99.99% quantile is 23.5: a uniform draw stays far below.
    assert chi_square(anchor_counts, anchors) < 23.5
    for c in anchors:
        given = [t for t in items if t["positive_class"] == c]
        negatives = Counter(t["negative_class"] for t in given)
        others = [n for n in ds.negative_pool if n != c]
        assert c not in negatives and set(negatives) == set(others)  # photo-only classes too
        assert chi_square(negatives, others) < 23.5  # df = 4
        # Sketch, positive and negative files uniform within their class.
        sketch_idx = Counter(Path(t["sketch_path"]).stem for t in given)
        assert chi_square(sketch_idx, [str(i) for i in range(SKETCH_COUNTS[c])]) < 35.0  # df <= 9


def test_every_file_is_reachable_including_the_first(draws):
    _, items = draws
    sketches = {t["sketch_path"] for t in items}
    photos = {t["positive_path"] for t in items} | {t["negative_path"] for t in items}
    anchors = ["a", "b", "c", "d", "e"]
    assert sketches == {f"/data/sketch/{c}/{i}.png" for c in anchors for i in range(SKETCH_COUNTS[c])}
    assert photos == {f"/data/photo/{c}/{i}.png" for c, n in PHOTO_COUNTS.items() for i in range(n)}
    # The released sampler never returned index 0 of a class; here it is drawn.
    assert "/data/sketch/b/0.png" in sketches and "/data/photo/a/0.png" in photos
    assert all(t["positive_path"].split("/")[3] == t["positive_class"] for t in items)
    assert all(t["negative_path"].split("/")[3] == t["negative_class"] for t in items)


def test_draws_are_reproducible_and_order_independent():
    a = make_dataset(seed=5)
    b = make_dataset(seed=5, order=["photo only", "e", "d", "sketch only", "c", "b", "a"])
    ids = [0, 1, 7, 99, 100, 5_000_123]  # any k >= 0, also beyond len()
    assert [a.describe(k) for k in ids] == [b.describe(k) for k in ids]
    other = make_dataset(seed=6)
    assert [a.describe(k) for k in range(50)] != [other.describe(k) for k in range(50)]
    # Each draw uses its own generator: the same k gives the same triplet in any order.
    assert [a.describe(k) for k in reversed(ids)][::-1] == [a.describe(k) for k in ids]
    assert a.describe(3)["index"] == 3
    with pytest.raises(IndexError):
        a.describe(-1)


def test_dataset_needs_two_photo_classes():
    with pytest.raises(DatasetError):
        TripletDataset(sketches={"a": [Path("x")]}, photos={"a": [Path("y")]}, length=1, image_size=8, seed=0)
    with pytest.raises(DatasetError):
        TripletDataset(sketches={"a": [Path("x")]}, photos={"b": [Path("y")], "c": [Path("z")]},
                       length=1, image_size=8, seed=0)


# ------------------------------------------------------------------------- index sampler

def test_sampler_ranks_are_disjoint_and_cover_the_epoch():
    length, world = 12, 3
    samplers = [TripletIndexSampler(length, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 2):
        shares = []
        for s in samplers:
            s.set_epoch(epoch)
            shares.append(list(s))
            assert len(s) == 4
        flat = [i for share in shares for i in share]
        assert sorted(flat) == list(range(epoch * length, (epoch + 1) * length))
    assert shares[1] == [2 * 12 + 1, 2 * 12 + 4, 2 * 12 + 7, 2 * 12 + 10]  # strided share


def test_sampler_drops_the_remainder_and_resumes():
    samplers = [TripletIndexSampler(10, rank=r, world_size=4) for r in range(4)]
    shares = [list(s) for s in samplers]
    assert [len(s) for s in samplers] == [2, 2, 2, 2]
    assert sorted(i for share in shares for i in share) == list(range(8))  # 8, 9 dropped
    s = TripletIndexSampler(10, shuffle_seed=1)
    s.set_epoch(3)
    full = list(s)
    assert sorted(full) == list(range(30, 40)) and full != sorted(full)
    s.set_epoch(3, skip=4)
    assert list(s) == full[4:] and len(s) == 6
    s2 = TripletIndexSampler(10, shuffle_seed=1)
    s2.set_epoch(3)
    assert list(s2) == full  # same seed and epoch -> same order
    s2.set_epoch(4)
    assert sorted(s2) == list(range(40, 50))
    with pytest.raises(ValueError):
        TripletIndexSampler(10, rank=4, world_size=4)


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    sketches, photos = {}, {}
    for c in ["cat", "dog", "owl"]:
        (root / c).mkdir()
        sketches[c], photos[c] = [], []
        for i in range(3):
            sk = np.full((12, 10, 3), 255, np.uint8)
            sk[rng.integers(0, 12), :] = 0
            Image.fromarray(sk).save(root / c / f"s{i}.png")
            Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).save(root / c / f"p{i}.png")
            sketches[c].append(root / c / f"s{i}.png")
            photos[c].append(root / c / f"p{i}.png")
    return TripletDataset(sketches=sketches, photos=photos, length=8, image_size=16, seed=11)


def test_getitem_loads_the_described_files(image_dataset):
    item = image_dataset[20]  # beyond len(): still valid
    described = image_dataset.describe(20)
    assert {k: item[k] for k in described} == described
    assert torch.equal(item["sketch"], preprocess_sketch(load_image(item["sketch_path"]), 16))
    assert torch.equal(item["positive"], preprocess_photo(load_image(item["positive_path"]), 16))
    assert torch.equal(item["negative"], preprocess_photo(load_image(item["negative_path"]), 16))
    assert item["sketch"].shape == (3, 16, 16) and item["negative"].dtype == torch.float32


def _collect(dataset, num_workers, world_size=1):
    out = {}
    for rank in range(world_size):
        sampler = TripletIndexSampler(len(dataset), rank=rank, world_size=world_size)
        sampler.set_epoch(1)
        loader = DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=num_workers)
        for batch in loader:
            for j, k in enumerate(batch["index"].tolist()):
                out[k] = (batch["sketch_path"][j], batch["positive_path"][j],
                          batch["negative_path"][j], batch["sketch"][j], batch["negative"][j])
    return out


def test_same_triplets_for_any_worker_count_and_rank_split(image_dataset):
    single = _collect(image_dataset, num_workers=0)
    assert sorted(single) == list(range(8, 16))  # epoch 1 ids
    for other in (_collect(image_dataset, num_workers=2), _collect(image_dataset, 0, world_size=2)):
        assert sorted(other) == sorted(single)
        for k in single:
            assert single[k][:3] == other[k][:3]
            assert torch.equal(single[k][3], other[k][3]) and torch.equal(single[k][4], other[k][4])


def test_unreadable_image_raises_with_path(tmp_path):
    bad = tmp_path / "cat" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"")
    ds = TripletDataset(sketches={"cat": [bad]}, photos={"cat": [bad], "dog": [bad]},
                        length=1, image_size=8, seed=0)
    with pytest.raises(ImageLoadError, match="broken.png"):
        ds[0]
    assert ds.describe(0)["sketch_path"] == str(bad)  # describe never touches the file


# --------------------------------------------------------------------- evaluation sets

def test_image_list_dataset(image_dataset, tmp_path):
    items = [(Path(p), c) for c in ["owl", "cat"] for p in image_dataset.photos[c]]
    ds = ImageListDataset(items=items, class_to_idx={"cat": 0, "owl": 1}, kind="photo", image_size=16)
    assert len(ds) == 6 and ds.labels.tolist() == [1, 1, 1, 0, 0, 0]
    item = ds[4]
    assert item["label"] == 0 and item["index"] == 4 and item["path"] == str(items[4][0])
    assert torch.equal(item["image"], preprocess_photo(load_image(items[4][0]), 16))
    sk = ImageListDataset(items=items[:1], class_to_idx={"owl": 0}, kind="sketch", image_size=16)
    assert torch.equal(sk[0]["image"], preprocess_sketch(load_image(items[0][0]), 16))
    with pytest.raises(DatasetError, match="owl"):
        ImageListDataset(items=items, class_to_idx={"cat": 0}, kind="photo", image_size=16)
    with pytest.raises(ValueError):
        ImageListDataset(items=items, class_to_idx={"cat": 0, "owl": 1}, kind="image", image_size=16)


def test_subsample_per_class():
    items = [(Path(f"/x/{c}/{i}.png"), c) for i in range(20) for c in ["a", "b", "c"]]
    items += [(Path("/x/d/0.png"), "d")]
    random.Random(0).shuffle(items)
    sub = subsample_per_class(items, 5, seed=0)
    counts = Counter(c for _, c in sub)
    assert counts == {"a": 5, "b": 5, "c": 5, "d": 1}
    positions = [items.index(it) for it in sub]
    assert positions == sorted(positions)  # original order kept
    assert sub == subsample_per_class(items, 5, seed=0)
    assert sub != subsample_per_class(items, 5, seed=1)
    # A class's choice depends only on its own items.
    only_a = [it for it in items if it[1] == "a"]
    assert [it for it in sub if it[1] == "a"] == subsample_per_class(only_a, 5, seed=0)
    assert subsample_per_class(items, None, seed=0) == items
    with pytest.raises(ValueError):
        subsample_per_class(items, 0, seed=0)


def test_pseudo_sketch_items_draw_the_positive_photo(image_dataset):
    from datasets.transforms import preprocess_pseudo_sketch

    assert "pseudo_sketch" not in image_dataset[3]  # no extras by default: the paper's items
    with_pseudo = TripletDataset(sketches=image_dataset.sketches, photos=image_dataset.photos, length=8,
                                 image_size=16, seed=11, extras=[PseudoSketches(16)])
    item = with_pseudo[3]
    assert item["positive_path"] == image_dataset.describe(3)["positive_path"]  # the same triplet stream
    assert torch.equal(item["pseudo_sketch"], preprocess_pseudo_sketch(load_image(item["positive_path"]), 16))
    assert item["pseudo_sketch"].shape == (3, 16, 16)


def test_augmented_items_crop_every_image_on_their_own_and_keep_the_triplet(image_dataset):
    from datasets.transforms import random_crop_flip

    kw = dict(sketches=image_dataset.sketches, photos=image_dataset.photos, length=8, image_size=16, seed=11)
    plain = TripletDataset(**kw, extras=[PseudoSketches(16)])
    augmented = TripletDataset(**kw, extras=[PseudoSketches(16), RandomCropFlips(seed=11)])
    for k in (0, 3, 20):
        a, p = augmented[k], plain[k]
        assert {key: a[key] for key in plain.describe(k)} == plain.describe(k)  # the same files
        rng = np.random.default_rng([11, k, 1])  # the documented stream, in the documented order
        for key in ("sketch", "positive", "pseudo_sketch", "negative"):
            assert torch.equal(a[key], random_crop_flip(p[key], rng)), (k, key)
        assert torch.equal(augmented[k]["positive"], a["positive"])  # the same on every call (any worker)
    assert any(not torch.equal(augmented[k]["negative"], plain[k]["negative"]) for k in range(8))
    with pytest.raises(ValueError, match="RandomCropFlips crops the photos, mask_lookup holds masks of whole photos"):
        TripletDataset(**kw, extras=[RandomCropFlips(seed=11)], mask_lookup=lambda path: torch.ones(4))
    TripletDataset(**kw, extras=[PseudoSketches(16)], mask_lookup=lambda path: torch.ones(4))  # no crop: fine


def test_build_datasets_reads_the_extras_from_the_data_configuration():
    """pseudo_sketch and augment choose the training items' extras; loss weights do not."""
    from datasets import training_extras
    from utils.config import DataConfig, make_config

    def kinds(**fields):
        return [type(e) for e in training_extras(DataConfig(image_size=16, **fields), 3)]

    assert kinds() == []  # the paper's items
    paper_data_with_extra_losses = make_config("b16", w_cls=1.0, w_inst=1.0, pseudo_sketch=False, check=False).data
    assert training_extras(paper_data_with_extra_losses, 3) == []  # a loss weight alone draws no pseudo-sketch
    assert kinds(pseudo_sketch=True) == [PseudoSketches]
    # the crop after the pseudo-sketch, so that it is cropped too; the seed is the dataset's
    extras = training_extras(DataConfig(image_size=16, pseudo_sketch=True, augment="crop_flip"), 3)
    assert [type(e) for e in extras] == [PseudoSketches, RandomCropFlips] and extras[1].seed == 3
    assert extras[0].image_size == 16
