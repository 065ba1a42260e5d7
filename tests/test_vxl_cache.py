"""models.vxl_cache and tools.precompute_masks: cached VxL masks equal the online ones, stale caches are refused."""
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from datasets import build_datasets, load_benchmark
from datasets.transforms import load_image, preprocess_photo
from losses import build_criterion
from models import build_model
from models.vxl_cache import (
    MaskCache, MaskCacheError, MaskCacheMissError, expected_cache_key, load_mask_cache_for_training,
    mask_cache_key, pack_masks, unpack_masks,
)
from models.vxl_sampler import VxLSampler, build_tiny_clip, build_vxl_sampler
from tools import precompute_masks
from conftest import empty_data_root, parse_train_args, train_args  # tests/ is on sys.path

SEEN = ["alarm clock", "cat", "café crème"]  # spaces and unicode in class names and paths
UNSEEN = ["cup", "sun"]
PHOTOS_PER_CLASS = 3  # 9 training photos


def run_precompute(root, out, *extra):
    return precompute_masks.main(["--data_path", str(root), "--custom_split", "--arch", "tiny", "--out", str(out),
                                  "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--no_progress",
                                  *extra])


def online_masks(sampler: VxLSampler, split):
    """Masks of every training photo computed plainly, one photo at a time: {relative path: [N]}."""
    result = {}
    for cname, files in split.train_photos.items():
        for path in files:
            image = preprocess_photo(load_image(path), 64)[None]  # [1, 3, 64, 64]
            result[path.relative_to(split.root).as_posix()] = sampler(image, [cname])[0]
    return result


@pytest.fixture(scope="module")
def tree(make_benchmark):
    """A tiny Sketchy-layout split with random 40x40 images (different photos, different masks), its masks."""
    root = make_benchmark(seen=SEEN, unseen=UNSEEN, per_class=(1, PHOTOS_PER_CLASS), unseen_per_class=1,
                          images="noise", size=40)
    out = root / "masks.npz"
    summary = run_precompute(root, out)
    return SimpleNamespace(root=root, out=out, summary=summary,
                           split=load_benchmark(root, "sketchy_extend", "test_class_sketchy25", check_canonical=False))


# tiny_sampler (conftest.py): what build_vxl_sampler("tiny") builds


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("n", [196, 64, 13])
def test_pack_roundtrip(n):
    g = torch.Generator().manual_seed(n)
    masks = (torch.rand(7, n, generator=g) > 0.6).float()  # [7, N]
    bits = pack_masks(masks)
    assert bits.dtype == np.uint8 and bits.shape == (7, (n + 7) // 8)  # 196 -> 25 bytes, 64 -> 8
    assert torch.equal(unpack_masks(bits, n), masks)
    # Bit order: the first patch is the most significant bit of byte 0 (numpy's default).
    one_hot = torch.zeros(1, n)
    one_hot[0, 0] = 1
    assert pack_masks(one_hot)[0, 0] == 128
    with pytest.raises(ValueError, match="only 0 and 1"):
        pack_masks(masks * 0.5)


def test_save_load_roundtrip_and_contains(tmp_path):
    cache = MaskCache(key={"k": 1}, num_patches=196, meta={"note": "x"})
    masks = (torch.arange(3 * 196).view(3, 196) % 3 == 0).float()
    cache.add(["a/1.jpg", "b\\2.jpg", "./c/3 x.jpg"], masks)
    cache.save(tmp_path / "c.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left behind
    loaded = MaskCache.load(tmp_path / "c.npz", expected_key={"k": 1})
    assert len(loaded) == 3 and loaded.paths == ["a/1.jpg", "b/2.jpg", "c/3 x.jpg"]
    assert "b/2.jpg" in loaded and "b\\2.jpg" in loaded and "z.jpg" not in loaded
    assert torch.equal(loaded.get_many(["a/1.jpg", "b/2.jpg", "c/3 x.jpg"]), masks)
    assert torch.equal(loaded.get("c/3 x.jpg"), masks[2]) and loaded.meta == {"note": "x"}
    with np.load(tmp_path / "c.npz") as raw:  # the documented layout
        assert raw["bits"].shape == (3, 25) and int(raw["num_patches"]) == 196
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(MaskCacheError, match="junk.npz: unreadable"):
        MaskCache.load(tmp_path / "junk.npz")


# ----------------------------------------------------------------------------- precompute
def test_precompute_equals_online_sampler(tree, tiny_sampler):
    assert tree.summary["computed"] == tree.summary["train_photos"] == 3 * PHOTOS_PER_CLASS
    args = parse_train_args(train_args(tree.root))
    cache = load_mask_cache_for_training(tree.out, args)
    assert cache.key == expected_cache_key(args) == mask_cache_key(tiny_sampler, image_size=64, clip=cache.key["clip"])
    # The sampler training builds (build_model) has the settings the key records.
    assert mask_cache_key(build_model(args).sampler, image_size=64, clip=cache.key["clip"]) == cache.key
    online = online_masks(tiny_sampler, tree.split)
    assert sorted(cache.paths) == sorted(online)
    for rel, mask in online.items():
        assert torch.equal(cache.get(rel), mask), rel  # bit-exact
        assert cache.get(rel).sum() == 64 - 45  # keep 0.3 of 64: floor(64 * 0.7) + 1 = 45 masked
    assert len({tuple(m.tolist()) for m in online.values()}) > 1  # masks differ between photos
    assert cache.meta["complete"] is True and "--data_path" in cache.meta["command"]


def test_refuses_cache_made_with_other_settings(tree, tmp_path, capsys):
    args = parse_train_args(train_args(tree.root))
    with pytest.raises(MaskCacheError, match=r"keep_ratio 0\.3 in cache vs 0\.5 now"):
        load_mask_cache_for_training(tree.out, parse_train_args(train_args(tree.root, keep_ratio=0.5)))
    with pytest.raises(MaskCacheError, match=r'prompt "\{\}" in cache vs "a photo of \{\}" now'):
        load_mask_cache_for_training(tree.out, parse_train_args(train_args(tree.root, prompt="a photo of {}")))
    with pytest.raises(MaskCacheError, match="feature_norm"):
        load_mask_cache_for_training(tree.out, parse_train_args(train_args(tree.root, vxl_norm="channel")))
    # Another CLIP: the tiny architecture with other (seed-1) weights, from a file.
    torch.save(build_tiny_clip(seed=1).state_dict(), tmp_path / "clip_seed1.pt")
    with pytest.raises(MaskCacheError, match="made with a different CLIP"):
        load_mask_cache_for_training(tree.out, parse_train_args(
            train_args(tree.root, clip_weights=str(tmp_path / "clip_seed1.pt"))))
    # Rerunning the tool with other settings on the same --out refuses rather than mixing masks.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_precompute(tree.root, tree.out, "--keep_ratio", "0.5")
    assert exc.value.code == 2  # a user error, as for every tool
    err = capsys.readouterr().err
    assert re.search(r"precompute_masks: error: .*keep_ratio 0\.3 in cache vs 0\.5 now", err), err
    assert f"--out {tree.out} holds another cache" in err
    assert load_mask_cache_for_training(tree.out, args).key["keep_ratio"] == 0.3  # untouched


def test_other_clip_file_gives_other_key_and_masks(tree, tmp_path):
    torch.save(build_tiny_clip(seed=1).state_dict(), tmp_path / "clip_seed1.pt")
    out = tmp_path / "seed1.npz"
    run_precompute(tree.root, out, "--clip_weights", str(tmp_path / "clip_seed1.pt"))
    args = parse_train_args(train_args(tree.root, clip_weights=str(tmp_path / "clip_seed1.pt")))
    cache = load_mask_cache_for_training(out, args)
    assert cache.key["clip"]["source"] == "file" and len(cache.key["clip"]["sha256"]) == 64
    online = online_masks(build_vxl_sampler("tiny", str(tmp_path / "clip_seed1.pt")), tree.split)
    assert all(torch.equal(cache.get(rel), m) for rel, m in online.items())
    seed0 = MaskCache.load(tree.out)
    assert any(not torch.equal(seed0.get(rel), m) for rel, m in online.items())


def test_missing_photo_has_clear_error(tree, tmp_path):
    cache = MaskCache.load(tree.out)
    with pytest.raises(KeyError) as info:
        cache.get("256x256/photo/tx_000000000000_ready/cat/nope.png")
    assert isinstance(info.value, MaskCacheMissError)
    message = str(info.value)
    assert "photo '256x256/photo/tx_000000000000_ready/cat/nope.png' is not in the mask cache" in message
    assert str(tree.out) in message and "python -m tools.precompute_masks --data_path" in message
    # A cache lacking training photos is refused before training starts, naming what is missing.
    partial = MaskCache(key=cache.key, num_patches=64, meta=cache.meta, source="partial.npz")
    partial.add(cache.paths[:-2], cache.get_many(cache.paths[:-2]))
    with pytest.raises(MaskCacheError, match=r"lacks 2 of the 9 training photos"):
        build_datasets(parse_train_args(train_args(tree.root)), mask_cache=partial)


def test_resume_after_interruption(tree, tmp_path, monkeypatch):
    out = tmp_path / "resumed.npz"
    calls = []
    original = VxLSampler.forward

    def failing_after_first_batch(self, images, names):
        calls.append(images.shape[0])
        if len(calls) > 1:
            raise KeyboardInterrupt  # the user stops it during the second batch
        return original(self, images, names)

    monkeypatch.setattr(VxLSampler, "forward", failing_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        run_precompute(tree.root, out, "--save_every", "1")
    partial = MaskCache.load(out)
    assert len(partial) == 4 and partial.meta["complete"] is False  # the first batch was saved

    calls.clear()
    monkeypatch.setattr(VxLSampler, "forward", lambda self, images, names: calls.append(images.shape[0])
                        or original(self, images, names))
    summary = run_precompute(tree.root, out)
    assert summary["already_cached"] == 4 and summary["computed"] == 5 and calls == [4, 1]  # only the rest
    resumed, full = MaskCache.load(out), MaskCache.load(tree.out)
    assert resumed.meta["complete"] is True and sorted(resumed.paths) == sorted(full.paths)
    assert torch.equal(resumed.get_many(full.paths), full.get_many(full.paths))
    calls.clear()
    assert run_precompute(tree.root, out)["computed"] == 0 and calls == []  # complete: nothing to do


def test_unreadable_photo_saves_progress_and_says_how_to_go_on(tree, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tree.root, root)
    split = load_benchmark(root, "sketchy_extend", "test_class_sketchy25", check_canonical=False)
    items = [path for _, files in sorted(split.train_photos.items()) for path in files]
    broken = items[5]  # in the second batch of 4
    good = broken.read_bytes()
    broken.write_bytes(b"")
    out = tmp_path / "masks.npz"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_precompute(root, out)  # default --save_every: nothing saved before the failure
    assert exc.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("precompute_masks: error: "), message
    assert str(broken) in message and "zero-byte" in message and "Original Traceback" not in message
    assert "4 masks computed in this run are saved" in message and "rerun the same command" in message
    assert len(MaskCache.load(out)) == 4
    broken.write_bytes(good)
    assert run_precompute(root, out)["computed"] == 5


# ----------------------------------------------------------------------------- training equivalence
def test_forward_with_cached_masks_equals_online_sampler(tree):
    """The key equivalence: the same batch gives the same losses and gradients with or without CLIP."""
    args = parse_train_args(train_args(tree.root, augment="none"))  # cached masks are of whole photos
    online_data = build_datasets(args)
    cached_data = build_datasets(args, mask_cache=load_mask_cache_for_training(tree.out, args))
    items = [cached_data["train"][k] for k in range(4)]
    assert all(it["positive_mask"].shape == (64,) and it["positive_mask"].dtype == torch.float32 for it in items)
    cached_batch = default_collate(items)
    online_batch = default_collate([online_data["train"][k] for k in range(4)])
    assert "positive_mask" not in online_batch and cached_batch["positive_mask"].shape == (4, 64)
    assert torch.equal(cached_batch["positive"], online_batch["positive"])

    args = args.replace(num_seen_classes=len(online_data["train"].label_names))  # as train.py: the class head too
    torch.manual_seed(0)
    online_model = build_model(args)  # with the CLIP sampler
    cached_model = build_model(args, with_sampler=False)
    assert cached_model.sampler is None
    cached_model.load_state_dict(online_model.state_dict(), strict=False)
    criterion = build_criterion(args)

    def step(model, batch):
        model.train()
        torch.manual_seed(123)  # the same dropout draws in both runs
        out = model(batch)
        losses = criterion(out)
        model.zero_grad()
        losses["loss"].backward()
        grads = [p.grad.clone() for p in model.trainable_parameters()]
        return out, losses, grads

    out_online, losses_online, grads_online = step(online_model, online_batch)
    out_cached, losses_cached, grads_cached = step(cached_model, cached_batch)
    assert torch.equal(out_cached["photo_mask"], out_online["photo_mask"])
    assert set(losses_online) == set(losses_cached) >= {"loss", "loss_tri", "loss_rec", "loss_int"}
    for name in losses_online:
        assert torch.equal(losses_cached[name], losses_online[name]), name
    assert all(torch.equal(a, b) for a, b in zip(grads_cached, grads_online))
    assert float(losses_online["loss_rec"].detach()) > 0


def test_model_rejects_bad_per_photo_masks(tree):
    model = build_model(parse_train_args(train_args(tree.root, w_inst=0)), with_sampler=False).eval()  # no aid
    img = torch.zeros(2, 3, 64, 64)
    batch = dict(sketch=img, positive=img, negative=img, positive_class=["cat"] * 2, negative_class=["sun"] * 2)
    with pytest.raises(ValueError, match="go together"):
        model({**batch, "positive_mask": torch.ones(2, 64)})
    with pytest.raises(ValueError, match=r"must be \[B, N\]"):
        model({**batch, "positive_mask": torch.ones(2, 63), "negative_mask": torch.ones(2, 63)})
    with pytest.raises(ValueError, match="not both"):
        model({**batch, "positive_mask": torch.ones(2, 64), "negative_mask": torch.ones(2, 64),
               "photo_mask": torch.ones(4, 64)})


def test_clip_identity_follows_the_open_clip_config_beside_the_file(tmp_path):
    """A CLIP file's activation may come from the open_clip_config.json beside it, so changing that file changes
    the masks' key; a file without one keeps the key it had."""
    from models.vxl_cache import clip_identity

    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"weights")
    bare = clip_identity("tiny", str(weights))
    assert set(bare) == {"model", "source", "sha256"}
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {"quick_gelu": false}}')
    gelu = clip_identity("tiny", str(weights))
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {"quick_gelu": true}}')
    quick = clip_identity("tiny", str(weights))
    assert gelu["sha256"] == quick["sha256"] == bare["sha256"]
    assert len({gelu["open_clip_config_sha256"], quick["open_clip_config_sha256"]}) == 2


@pytest.mark.parametrize("extra, message", [
    (("--arch", "b16", "--vit_weights", "none"), "the b16 preset needs --clip_weights"),
    (("--clip_weights", "missing_clip.pt", "--augment", "none"), "CLIP checkpoint not found: "),
])
def test_a_cache_without_its_clip_is_a_one_line_error(tmp_path, caplog, extra, message):
    """--vxl_cache is checked against the CLIP that made it: without that CLIP, train.py says so and exits 2."""
    import train

    extra = tuple(str(tmp_path / e) if e.endswith(".pt") else e for e in extra)
    argv = train_args(empty_data_root(tmp_path / "data"), tmp_path / "out", "x", "--vxl_cache",
                      str(tmp_path / "masks.npz"), *extra)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(message) and "Traceback" not in caplog.text, caplog.text
