import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One intra-op thread: the test models are tiny, and on a 2-core machine several threads per
# process oversubscribe the cores (measured: up to 20x slower when other work is running).
import torch  # noqa: E402

torch.set_num_threads(1)


from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What running the tests legitimately leaves in the repository (all git-ignored).
_OWN_FILES = (".venv/", ".pytest_cache/", "__pycache__/", ".pyc", ".egg-info/")


def _repository_state():
    """``git status`` of the repository, ignored files included but not those the test run itself makes;
    None where git cannot say (no git, not a clone)."""
    import subprocess

    try:
        out = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=all",
                              "--ignored=matching"], cwd=REPO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return {line for line in out.stdout.splitlines() if not any(own in line for own in _OWN_FILES)}


@pytest.fixture(autouse=True)
def _repository_left_unchanged():
    """A test writes under tmp_path, never into the repository: one that creates or modifies a file
    there (a new or changed ``git status`` line, ignored files such as results/ included) fails."""
    before = _repository_state()
    yield
    after = _repository_state() if before is not None else None
    if after is not None and after != before:
        changed = sorted(after - before) + [f"(no longer) {line}" for line in sorted(before - after)]
        pytest.fail("the test changed the repository's working tree (write under tmp_path instead): "
                    + "; ".join(changed), pytrace=False)


# `make test` runs the suite on pytest-xdist workers that each take whole modules (--dist loadscope
# --no-loadscope-reorder), so a module- or session-scoped run is made once. The modules that run longest go first
# (the shared learning run, the submitit jobs, the two-process runs, the signal tests), so that the workers finish
# together instead of one starting the longest module last.
LONGEST_MODULES = ("test_train_e2e.py", "test_submit.py", "test_distributed.py", "test_robustness.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: the rest keep their order


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Every test module starts with one thread, whatever an earlier module (e.g. an end-to-end run) set."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# Benchmarks on disk: the one place the tests lay out a benchmark (make_benchmark) and share one (bench)
# ------------------------------------------------------------------------------------------------
# The released ZSE-SBIR layouts, written out here independently of datasets/ so a change there that breaks
# real data also breaks the tests. Tests import these names (tests/ is on sys.path).
SKETCHY_SKETCHES = "256x256/sketch/tx_000000000000_ready"
SKETCHY_PHOTOS = "256x256/photo/tx_000000000000_ready"
SKETCHY_EXTENDED = "EXTEND_image_sketchy_ready"  # the extended photos; photo i goes to folder i % 2
AM_TRAIN_PHOTOS = "ambiguity"  # Sketchy-AM's training photos (test_class_sketchyam)
SKETCHY_LISTS = {"sketch_train": "sketch_tx_000000000000_ready_filelist_train.txt",
                 "photo_train": "all_photo_filelist_train.txt",
                 "sketch_zero": "sketch_tx_000000000000_ready_filelist_zero.txt",
                 "photo_zero": "all_photo_filelist_zero.txt"}
# layout -> dataset folder, its test classes (the first is the default) and their split folders, sketch
# folder, photo folders, photo extension, list files
LAYOUTS = {
    "sketchy": dict(dataset="Sketchy", splits={"test_class_sketchy25": "zeroshot1", "test_class_sketchy21": "zeroshot0",
                                               "test_class_sketchyam": "zeroshot2"},
                    sketches=SKETCHY_SKETCHES, photos=(SKETCHY_PHOTOS, SKETCHY_EXTENDED), photo_ext=".jpg",
                    lists=SKETCHY_LISTS),
    "tuberlin": dict(dataset="TUBerlin", splits={"test_class_tuberlin30": "zeroshot"}, sketches="png_ready",
                     photos=("ImageResized_ready",), photo_ext=".JPEG",
                     lists={"sketch_train": "png_ready_filelist_train.txt",
                            "photo_train": "ImageResized_ready_filelist_train.txt",
                            "sketch_zero": "png_ready_filelist_zero.txt",
                            "photo_zero": "ImageResized_ready_filelist_zero.txt"}),
    "quickdraw": dict(dataset="QuickDraw", splits={"test_class_quickdraw30": "zeroshot"}, sketches="sketches",
                      photos=("images",), photo_ext=".jpg",
                      lists={"sketch_train": "sketch_train.txt", "photo_train": "all_photo_train.txt",
                             "sketch_zero": "sketch_zero.txt", "photo_zero": "all_photo_zero.txt"}),
}
_STEMS = {"sketch_train": "s", "photo_train": "p", "sketch_zero": "zs", "photo_zero": "zp"}


def _image_bytes(images: str, size: int, ext: str, rng) -> bytes:
    """One encoded image: ``blank`` (white, the same bytes every time) or ``noise`` (random pixels)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = (np.full((size, size, 3), 255, np.uint8) if images == "blank"
              else rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG" if ext.lower() in (".jpg", ".jpeg") else "PNG")
    return buf.getvalue()


def _write_benchmark(root, *, layout, test_class, seen, unseen, counts, images, size, seed, lists, name,
                     backslash, junk):
    import numpy as np

    spec = LAYOUTS[layout]
    dataset_dir = root / spec["dataset"]
    rng = np.random.default_rng(seed)
    blank = {}
    backslash = set(_STEMS) if backslash is True else set(backslash or ())
    lines = {kind: [] for kind in _STEMS}
    folders = set()
    for split, classes, (n_sketch, n_photo) in (("train", seen, counts[0]), ("zero", unseen, counts[1])):
        for kind, n in (("sketch", n_sketch), ("photo", n_photo)):
            key = f"{kind}_{split}"
            for label, cls in enumerate(classes):
                for i in range(n):
                    if kind == "sketch":
                        top, ext = spec["sketches"], ".png"
                    elif split == "train" and test_class == "test_class_sketchyam":
                        top, ext = AM_TRAIN_PHOTOS, spec["photo_ext"]
                    else:
                        top, ext = spec["photos"][i % len(spec["photos"])], spec["photo_ext"]
                    rel = f"{top}/{cls}/{name.format(stem=_STEMS[key], i=i, cls=cls)}{ext}"
                    path = dataset_dir / rel
                    if path.parent not in folders:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        folders.add(path.parent)
                    if images == "noise":
                        path.write_bytes(_image_bytes(images, size, ext, rng))
                    else:  # blank: encoded once per format
                        if ext not in blank:
                            blank[ext] = _image_bytes(images, size, ext, rng)
                        path.write_bytes(blank[ext])
                    lines[key].append((rel.replace("/", "\\") if key in backslash else rel) + f" {label}\n")
    if junk:  # what raw downloads hold beside the images, and every reader must skip
        for folder in folders:
            (folder / ".DS_Store").write_bytes(b"junk")  # hidden
            (folder / "notes.txt").write_text("not an image")
    if lists:
        split_dir = dataset_dir / spec["splits"][test_class]
        split_dir.mkdir(parents=True, exist_ok=True)
        (split_dir / "cname_cid.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(seen)), encoding="utf-8")
        (split_dir / "cname_cid_zero.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(unseen)),
                                                       encoding="utf-8")
        for key, fname in spec["lists"].items():
            (split_dir / fname).write_text("".join(lines[key]), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def make_benchmark(tmp_path_factory):
    """``make_benchmark(layout="sketchy", *, seen=3, unseen=2, per_class=2, size=64, **options) -> data root``:
    writes a small benchmark, the data root a test passes as ``--data_path`` (``--custom_split``).

    ``layout``: ``sketchy``, ``tuberlin`` or ``quickdraw`` (the released folders, class files and lists).
    ``seen``/``unseen``: a number of classes or their names (any names, spaces and unicode included; with
    ``images="drawn"`` names of :mod:`datasets.synthetic`, a number taking its first seen/unseen classes, None
    all of them). ``per_class``: images per seen class, ``n`` or ``(sketches, photos)``; ``unseen_per_class``
    likewise for unseen classes (default: ``per_class``). ``size``: image side in pixels.

    Options: ``images`` -- ``"drawn"`` (default: :func:`datasets.synthetic.make_synthetic_benchmark`, its own
    file names and stamp; Sketchy layout with lists only), ``"blank"`` (white images, fast) or ``"noise"``
    (random pixels: every photo its own VxL mask); ``test_class`` (a split of the layout, e.g.
    ``test_class_sketchy21``; ``test_class_sketchyam`` puts training photos under ``ambiguity/``); ``lists=False``
    (raw image folders only, as :mod:`datasets.prepare` reads them, with a hidden and a text file in every
    class folder unless ``junk=False``); ``name`` (file name without extension, from ``{stem}`` -- s, p, zs, zp
    for training/test sketches/photos --, ``{i}`` and ``{cls}``; default ``"{stem} {i}"``); ``backslash``
    (Windows separators in all lists, or in the list kinds named, e.g. ``("photo_train",)``); ``seed``;
    ``root`` (write there, beside what it holds; default: a new folder under pytest's tmp folder).
    Sketches are PNG, photos the layout's format; Sketchy photo ``i`` is in the extended folder when ``i`` is odd.
    """

    def make(layout="sketchy", *, seen=3, unseen=2, per_class=2, size=64, images="drawn", unseen_per_class=None,
             test_class=None, lists=True, name="{stem} {i}", backslash=False, junk=None, seed=0, root=None):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose {list(LAYOUTS)}")
        test_class = test_class or next(iter(LAYOUTS[layout]["splits"]))
        if test_class not in LAYOUTS[layout]["splits"]:
            raise ValueError(f"{layout} has no {test_class}; choose {list(LAYOUTS[layout]['splits'])}")
        counts = [(n, n) if isinstance(n, int) else tuple(n)
                  for n in (per_class, per_class if unseen_per_class is None else unseen_per_class)]
        root = tmp_path_factory.mktemp(f"{layout}_{images}") / "data" if root is None else Path(root)
        if images == "drawn":
            from datasets.synthetic import SEEN_CLASSES, UNSEEN_CLASSES, make_synthetic_benchmark

            plain = (layout, test_class, lists, name, backslash, junk) == (
                "sketchy", "test_class_sketchy25", True, "{stem} {i}", False, None)
            if not plain or counts[1][0] != counts[1][1]:
                raise ValueError("drawn benchmarks are datasets.synthetic's: Sketchy layout with lists, as many "
                                 "unseen sketches as photos; use images='blank' or 'noise' for other layouts")
            if seen is None and unseen is None:
                classes = None
            else:
                classes = [*(SEEN_CLASSES if seen is None else SEEN_CLASSES[:seen] if isinstance(seen, int) else seen),
                           *(UNSEEN_CLASSES if unseen is None else UNSEEN_CLASSES[:unseen] if isinstance(unseen, int)
                             else unseen)]
            return make_synthetic_benchmark(root, seed=seed, sketches_per_class=counts[0][0],
                                            photos_per_class=counts[0][1], unseen_per_class=counts[1][0], size=size,
                                            classes=classes, progress=False)
        if images not in ("blank", "noise"):
            raise ValueError(f"images must be 'drawn', 'blank' or 'noise', not {images!r}")
        seen = [f"seen {i}" for i in range(seen)] if isinstance(seen, int) else list(seen)
        unseen = [f"unseen {i}" for i in range(unseen)] if isinstance(unseen, int) else list(unseen)
        return _write_benchmark(root, layout=layout, test_class=test_class, seen=seen, unseen=unseen, counts=counts,
                                images=images, size=size, seed=seed, lists=lists, name=name, backslash=backslash,
                                junk=(not lists) if junk is None else junk)

    return make


def _tree_state(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="session")
def bench(make_benchmark):
    """The shared drawn benchmark for runs of train.py: 3 seen + 2 unseen classes of datasets.synthetic (sun,
    moon, star; mushroom, candle), 8 sketches and 8 photos per seen class, 4 of each per unseen class, 64 px.
    Drawn once per session: read it, never change it (a test that damages files copies it first; a change is
    an error at the end of the session)."""
    root = make_benchmark(seen=3, unseen=2, per_class=8, unseen_per_class=4, size=64)
    before = _tree_state(root)
    yield root
    after = _tree_state(root)
    assert after == before, ("a test changed the shared bench (copy it first): "
                             f"{sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))}")


# ------------------------------------------------------------------------------------------------
# Arguments of train.py, and the tiny preset's VxL sampler
# ------------------------------------------------------------------------------------------------
# What every small run of train.py here shares: the tiny preset on the CPU (its CLIP's grid needs the preset's
# 64 px images: no --image_size), data read in the main process, no TensorBoard pictures.
TRAIN_DEFAULTS = {"custom_split": True, "arch": "tiny", "num_workers": 0, "no_progress": True, "no_tb_images": True,
                  "device": "cpu"}


def train_args(root=None, out=None, exp=None, *extra, **overrides) -> list[str]:
    """argv of a small train.py run: ``--data_path root --output_dir out --exp exp``, :data:`TRAIN_DEFAULTS`
    updated by ``overrides`` (``flag=value``; True: a bare flag, False or None: leave the flag out; a list:
    several values), then ``extra`` as it is (e.g. ``"--no-testall"``; a later flag wins). ``root`` None:
    the synthetic benchmark."""
    argv = []
    for key, value in (("exp", exp), ("output_dir", out), ("data_path", root)):
        if value is not None:
            argv += [f"--{key}", str(value)]
    for key, value in {**TRAIN_DEFAULTS, **overrides}.items():
        if value is True:
            argv.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv + [str(a) for a in extra]


def parse_train_args(argv):
    """The configuration (utils.config.RunConfig) train.py runs with for ``argv``."""
    import train
    from utils.config import parse_config

    return parse_config(train.get_args_parser().parse_args([str(a) for a in argv]))


def empty_data_root(root: Path, dataset: str = "sketchy_extend", test_class: str | None = None) -> Path:
    """A data root with the dataset and split folders of ``dataset``/``test_class`` and nothing in them: what
    train.py checks before it writes anything, for tests of errors that must come before any data is read."""
    from datasets.benchmarks import resolve_split

    _, _, spec = resolve_split(dataset, test_class)
    (root / spec.dataset_dir / spec.split_dir).mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def tiny_sampler():
    """The tiny preset's VxL sampler (what ``build_vxl_sampler("tiny")`` builds): a seeded random tiny CLIP,
    64 px images in 8 px patches (64 patches), keep ratio 0.3; frozen and always in eval mode. One per module,
    not per session: its text-feature cache fills as it is used, and text features encoded in another batch
    differ in the last bit, so a module's exact comparisons must not depend on what other modules asked it
    (building one takes ~0.1 s). A test that changes a sampler builds its own ``VxLSampler.tiny(...)``."""
    from models.vxl_sampler import VxLSampler

    return VxLSampler.tiny()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, with almost no data (never decoded):
    how Pillow's decompression-bomb guards are met without allocating the image."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------
# One training run that learns, shared by the session (learned_run)
# ------------------------------------------------------------------------------------------------
# A family cell (datasets.family) the tiny preset was not tuned on: 8 seen / 4 unseen single-shape classes, 30
# sketches and 30 photos each, flat and noisy photos, clean sketches, 64 px (FamilySpec's fields).
LEARN_CELL = {"name": "learn_cell", "layout": "sketchy", "seen": 8, "unseen": 4, "per_class": 30,
              "photo_styles": ("flat", "noisy"), "sketch_styles": ("clean",), "parts": (1, 1), "sketch_size": 64,
              "photo_size": (64, 64), "seed": 11}
# A brief schedule of the tiny preset's defaults: 7 epochs of 25 steps of 16 triplets (175 updates), evaluated once,
# after the last epoch. The run learns between steps 100 and 175; short epochs make the last epoch's training
# figures those of its last 25 steps.
LEARN_SCHEDULE = {"epoch": 7, "datasetLen": 400, "batch_size": 16}


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory):
    """The session's one training run that learns: train.main with the tiny preset's defaults on
    :data:`LEARN_CELL` for :data:`LEARN_SCHEDULE` (seed 0; TensorBoard pictures on). The longest run of the suite,
    made once for every test that needs a run that learns: test_train_e2e.py's learning bars, its
    checks of the loop, the experiment folder and test.py.

    A namespace: ``spec`` (the FamilySpec), ``root`` (its data root, ``--data_path``), ``argv`` (train.py's),
    ``folder`` (the experiment folder), ``result`` (what train.main returned), ``log`` (log.txt's lines). Read the
    folder, never change it (a test that writes there, such as test.py, copies it first; a change is an error at
    the end of the session)."""
    import json
    from types import SimpleNamespace

    import train
    from datasets.family import FamilySpec, make_family_benchmark

    spec = FamilySpec(**LEARN_CELL)
    root = make_family_benchmark(tmp_path_factory.mktemp("learn_cell") / "data", spec)
    out = tmp_path_factory.mktemp("learned")
    # One DataLoader worker (the other runs here read in this process): it decodes, crops and outlines the next
    # batches on the second core while this process trains; the triplets are the same (seeded by index: the same
    # losses measured with 0 and 1 workers), and a worker-fed training run is covered too.
    argv = train_args(root, out, "cell", dataset=spec.dataset, test_class=spec.test_class, eval_every=1000,
                      no_tb_images=False, num_workers=1, **LEARN_SCHEDULE)
    result = train.main(argv)
    folder = out / "cell"
    log = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]
    before = _tree_state(folder)
    yield SimpleNamespace(spec=spec, root=root, argv=argv, folder=folder, result=result, log=log)
    after = _tree_state(folder)
    assert after == before, ("a test changed the shared learning run's folder (copy it first): "
                             f"{sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))}")


@pytest.fixture
def micro_preset(monkeypatch):
    """Registers "micro", the narrowed tiny preset that tests/fixtures/format1_micro.pth was trained with
    (tests/fixtures/make_format1_checkpoint.py)."""
    import dataclasses

    from utils.presets import ARCHITECTURES, PRESETS

    tiny = ARCHITECTURES["tiny"]
    monkeypatch.setitem(ARCHITECTURES, "micro", dataclasses.replace(
        tiny, name="micro", encoder=dataclasses.replace(tiny.encoder, embed_dim=32, depth=1, num_heads=1,
                                                         stem_channels=(4, 8, 16)),
        interaction=dataclasses.replace(tiny.interaction, d_model=32, nhead=4, num_layers=1, dim_feedforward=32)))
    monkeypatch.setitem(PRESETS, "micro", PRESETS["tiny"].replace(arch="micro"))
    return "micro"


def preset_encoder(arch: str = "tiny", *, separate_photo_encoder: bool = False, **settings):
    """``models.build_encoder`` of preset ``arch``'s settings, ``settings`` (dropout, stem_norm, ln_eps, input_norm)
    changed."""
    from models.encoder import build_encoder
    from utils.presets import get_preset

    model = get_preset(arch).replace(**settings).model
    return build_encoder(arch, separate_photo_encoder=separate_photo_encoder, dropout=model.dropout,
                         stem_norm=model.stem_norm, ln_eps=model.ln_eps, input_norm=model.input_norm)


def tiny_config(**settings):
    """The tiny preset's sizes on the paper's path: without its training aids (pseudo-sketches, seen-class head,
    photo standardisation) unless ``settings`` (flat names) adds them."""
    from utils.config import make_config

    return make_config("tiny", check=False, **{"w_cls": 0.0, "w_inst": 0.0, "input_norm": "none", **settings})
