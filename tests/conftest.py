import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One intra-op thread: the test models are tiny, and on a 2-core machine several threads per
# process oversubscribe the cores (measured: up to 20x slower when other work is running).
import torch  # noqa: E402

torch.set_num_threads(1)


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


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Every test module starts with one thread, whatever an earlier module (e.g. an end-to-end run) set."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A small synthetic benchmark for runs of train.py: 4 seen + 2 unseen classes, 64 px (one per module)."""
    from datasets.synthetic import CLASSES, UNSEEN_CLASSES, make_synthetic_benchmark

    seen = [c for c in CLASSES if c not in UNSEEN_CLASSES][:4]
    root = tmp_path_factory.mktemp("bench") / "bench"
    return make_synthetic_benchmark(root, seed=0, sketches_per_class=6, photos_per_class=6, unseen_per_class=4,
                                    size=64, classes=seen + list(UNSEEN_CLASSES[:2]), progress=False)


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
