"""Sketch search over a photo gallery: what ``tools.retrieve`` (one query) and ``tools.demo`` (a web page) share.

Once per (checkpoint, gallery):

1. the gallery: a folder of images (recursive; an image in a subfolder has that subfolder's name as
   its class) or the unseen-class photos of a benchmark split, the checkpoint's own by default;
2. its photo embeddings ``[G, D]``, computed once (with a progress bar) and cached on disk; the cache
   is reused while the checkpoint file and every gallery file (path, size, modification time) are
   unchanged;
3. an index over the L2-normalised embeddings (inner product = cosine): ``exact`` (a chunked matrix
   product, on the GPU when there is one) or ``faiss`` (an IVF-Flat index, built once and cached beside
   the embeddings, rebuilt when the gallery changes; faiss-gpu is used when installed and the device is
   CUDA). ``auto`` takes FAISS above :data:`FAISS_MIN_GALLERY` photos.

Then :meth:`SketchSearch.search` ranks the gallery for any number of sketches (a PIL image, through the
same preprocessing as a dataset sketch: ink threshold, crop, pad). Ties keep the gallery order.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tools import ToolError, select_device
from utils.io import atomic_write

log = logging.getLogger("search")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CACHE_FORMAT = 1
FAISS_FORMAT = 1
UNKNOWN_CLASS = ""  # gallery images directly in the gallery folder have no class
INDEX_KINDS = ("exact", "faiss", "auto")

# ``--index auto`` searches exactly up to this many gallery photos and through FAISS above. Measured with
# ``python -m tools.bench_search`` on the 2-core CPU (clustered 768-d vectors; docs/results/bench_search.md):
# exact search takes a median 2.1 ms per query at 10k photos, 24 ms at 100k and 239 ms at 1M;
# IVF-Flat with the defaults below 0.10 / 0.74 / 6.6 ms at recall@10 1.000, after a build of 0.3 s / 10 s /
# 2 min (cached). Exact search is exact and needs no build, so it is kept while a query stays well inside
# an interactive budget: it passes 20 ms per query at about 85k photos there (a line through the three sizes),
# and 50k leaves room for a slower or busier CPU. On a GPU exact search is far faster; the constant is the
# CPU's, the slowest case.
FAISS_MIN_GALLERY = 50_000

EXACT_CHUNK = 1 << 16  # gallery rows per matrix product: scores [Q, 65536] fp32, 256 KiB per query
# IVF-Flat: about 4·√G cells (FAISS's guideline: 4√G to 16√G), each trained on at least 39 vectors (fewer
# and k-means warns and makes poor cells), and NPROBE_FRACTION of the cells visited per query. In
# tools.bench_search 1/128 of the cells already gives recall@10 0.89-0.97 at 10k-1M photos and 1/64 gives
# 0.995-1.000; 1/32 leaves a margin for real embeddings, less clustered than the benchmark's (--nprobe overrides it).
IVF_CELLS_PER_SQRT = 4
IVF_MIN_TRAIN_PER_CELL = 39
IVF_MAX_TRAIN_PER_CELL = 64  # k-means on a sample: more points hardly move the cells, they cost build time
NPROBE_FRACTION = 1 / 32


# ----------------------------------------------------------------------------- command line
def add_search_args(p: argparse.ArgumentParser) -> None:
    """The flags of the gallery, its cache, the index and the device, shared by tools.retrieve and tools.demo."""
    g = p.add_argument_group("gallery (default: the unseen photos of the checkpoint's own split)")
    g.add_argument("--gallery", default=None,
                   help="a folder of images (recursive); images in subfolders take the subfolder's name as class")
    g.add_argument("--data_path", default=None, help="benchmark root, as train.py (default: the checkpoint's)")
    g.add_argument("--dataset", default=None, help="as train.py (default: the checkpoint's)")
    g.add_argument("--test_class", default=None, help="as train.py (default: the checkpoint's)")
    g.add_argument("--custom_split", action="store_true", default=None,
                   help="as train.py (default: the checkpoint's)")
    g.add_argument("--synthetic_dir", default=None,
                   help="cache folder of the synthetic benchmark (default: the checkpoint's)")
    s = p.add_argument_group("search")
    s.add_argument("--index", default="auto", choices=INDEX_KINDS,
                   help=f"exact: every photo scored; faiss: an IVF-Flat index (pip install faiss-cpu); auto "
                        f"(default): exact up to {FAISS_MIN_GALLERY:,} photos, FAISS above")
    s.add_argument("--nprobe", type=int, default=None,
                   help=f"FAISS cells visited per query (default: 1/{round(1 / NPROBE_FRACTION)} of them); "
                        f"more is slower and closer to exact")
    s.add_argument("--cache_dir", default=None,
                   help="gallery embedding cache (default: $PUXIM_CACHE/retrieval or ~/.cache/puxim/retrieval)")
    s.add_argument("--no_cache", action="store_true", help="embed the gallery again and write no cache")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: CUDA if available")
    s.add_argument("--batch_size", type=int, default=32, help="gallery images per forward pass (default 32)")
    s.add_argument("--num_workers", type=int, default=0, help="data loader processes for the gallery (default 0)")
    s.add_argument("--no_progress", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------- gallery
@dataclass
class Gallery:
    """The photos searched: ``items`` ``(absolute path, class)`` in a fixed order, the folders holding them
    (what a server may serve) and an id naming the gallery in the cache."""
    items: list[tuple[str, str]]
    folders: list[str]
    gallery_id: str

    @property
    def classes(self) -> list[str]:
        return sorted({c for _, c in self.items if c != UNKNOWN_CLASS})


def scan_gallery(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """Every image file under ``folder`` (recursive, sorted, hidden entries skipped) as ``(path, class)``.

    The class is the name of the image's folder; images directly in ``folder`` get ``UNKNOWN_CLASS``.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ToolError(f"--gallery {folder}: not a folder (give a folder of JPEG/PNG images).")
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            items.append((str((here / name).resolve()), UNKNOWN_CLASS if here == root else here.name))
    if not items:
        raise ToolError(f"--gallery {folder}: no images found (looked recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}).")
    return items


def split_gallery(args, saved: dict) -> tuple[list[tuple[str, str]], str]:
    """The unseen photos of a benchmark split: ``--data_path``... or the checkpoint's own data args."""
    from datasets import load_split

    data_path = args.data_path if args.data_path is not None else saved.get("data_path")
    if data_path is not None and args.data_path is None and not Path(data_path).expanduser().is_dir():
        raise ToolError(f"the checkpoint was trained on --data_path {data_path}, which is not there (any more): "
                        f"pass --data_path ROOT where the dataset is now, or --gallery FOLDER to search a folder "
                        f"of photos.")
    # This command's data flags, each falling back to the checkpoint's.
    split = load_split(SimpleNamespace(
        data_path=data_path, synthetic_dir=args.synthetic_dir or saved.get("synthetic_dir"),
        dataset=args.dataset or saved.get("dataset"), test_class=args.test_class or saved.get("test_class"),
        custom_split=args.custom_split if args.custom_split is not None else saved.get("custom_split")),
        progress=not args.no_progress)
    items = [(str(Path(p).resolve()), c) for p, c in split.test_photos]
    return items, f"{split.name}@{split.root.resolve()}"


def open_gallery(args, saved: dict) -> Gallery:
    """``--gallery FOLDER`` (the folder is what may be served), else the split's unseen photos (their folders)."""
    if args.gallery is not None:
        items = scan_gallery(args.gallery)
        root = str(Path(args.gallery).expanduser().resolve())
        return Gallery(items, [root], root)
    items, gallery_id = split_gallery(args, saved)
    if not items:
        raise ToolError(f"the split {gallery_id} has no unseen-class photos to search; pass --gallery FOLDER.")
    return Gallery(items, sorted({str(Path(p).parent) for p, _ in items}), gallery_id)


# ----------------------------------------------------------------------------- embedding cache
def default_cache_dir() -> Path:
    from datasets.synthetic import default_cache_dir as puxim_cache

    return puxim_cache() / "retrieval"


def _stat(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def cache_key(checkpoint: str, image_size: int, items: list[tuple[str, str]]) -> str:
    """Hash of what the embeddings depend on: the checkpoint file, the input size, every gallery file."""
    try:
        content = {"format": CACHE_FORMAT, "checkpoint": _stat(str(Path(checkpoint).resolve())),
                   "image_size": image_size, "gallery": [_stat(p) for p, _ in items]}
    except FileNotFoundError as e:
        raise ToolError(f"{e.filename}: file not found (listed in the gallery).") from None
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def cache_file(cache_dir: Path, checkpoint: str, gallery_id: str, image_size: int) -> Path:
    """One cache file per (checkpoint path, gallery, input size): a changed gallery replaces it."""
    slot = json.dumps([str(Path(checkpoint).resolve()), gallery_id, image_size])
    return cache_dir / f"gallery-{hashlib.sha1(slot.encode()).hexdigest()[:16]}.npz"


def read_cache(path: Path, key: str, num: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key or data["feats"].shape[0] != num:
                return None
            return data["feats"].astype(np.float32)
    except Exception as e:  # an unreadable cache is only a cache: embed again
        log.warning("ignoring unreadable embedding cache %s (%s)", path, e)
        return None


def write_cache(path: Path, key: str, feats: np.ndarray, items: list[tuple[str, str]]) -> None:
    """Write atomically (temporary file, then rename): a reader never sees half a cache."""
    with atomic_write(path, "wb") as f:
        np.savez(f, key=np.array(key), feats=feats.astype(np.float32), paths=np.array([p for p, _ in items]))


# ----------------------------------------------------------------------------- model
def open_checkpoint(path: str) -> dict:
    """A checkpoint written by train.py (its configuration is needed to rebuild the model)."""
    from utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    checkpoint_settings(ckpt, path)  # refused now, not after the gallery is embedded
    return ckpt


def checkpoint_settings(ckpt: dict, path: str) -> dict:
    """The flat settings a checkpoint was trained with (any checkpoint format)."""
    from utils.config import ConfigError, config_from_checkpoint

    try:
        return config_from_checkpoint(ckpt, str(path)).flat()
    except ConfigError as e:
        raise ToolError(str(e)) from None


def build_from_checkpoint(ckpt: dict, ckpt_path: str, device: torch.device):
    """The PuXIM model of a checkpoint (its saved args), weights loaded, no sampler, nothing downloaded."""
    from models import build_model
    from utils.checkpoint import load_model_weights

    from utils.config import config_from_checkpoint

    # The checkpoint holds the trained weights: no pretrained initialisation.
    config = config_from_checkpoint(ckpt, ckpt_path).replace(vit_weights=None)
    try:
        model = build_model(config, with_sampler=False)
    except ValueError as e:
        raise ToolError(f"{ckpt_path}: cannot rebuild the model from its saved arguments: {e}") from None
    load_model_weights(model, ckpt["model"], source=ckpt_path)
    return model.to(device).eval()


def embed_gallery(model, items, *, image_size: int, device, batch_size: int, num_workers: int,
                  progress: bool) -> np.ndarray:
    """Photo embeddings ``[G, D]`` of the gallery, through the same loop (and tqdm bar) as evaluation."""
    from torch.utils.data import DataLoader

    import engine
    from datasets import ImageListDataset

    classes = sorted({c for _, c in items})
    dataset = ImageListDataset(items=items, class_to_idx={c: i for i, c in enumerate(classes)},
                               kind="photo", image_size=image_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    feats, _, _ = engine.extract_features(model, loader, device=device, modality="photo", progress=progress)
    return feats.cpu().numpy()  # [G, D]


def gallery_features(args, model, gallery: Gallery, image_size: int, device) -> tuple[np.ndarray, str, Path]:
    """Photo embeddings ``[G, D]``: from the cache when it is valid, else embedded (and cached).

    Also returns the cache key and file, which the FAISS index is cached under too.
    """
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    key = cache_key(args.checkpoint, image_size, gallery.items)
    path = cache_file(cache_dir, args.checkpoint, gallery.gallery_id, image_size)
    feats = None if args.no_cache else read_cache(path, key, len(gallery.items))
    if feats is not None:
        log.info("using cached gallery embeddings from %s (%d images)", path, len(gallery.items))
    else:
        log.info("embedding %d gallery images", len(gallery.items))
        feats = embed_gallery(model, gallery.items, image_size=image_size, device=device,
                              batch_size=args.batch_size, num_workers=args.num_workers,
                              progress=not args.no_progress)
        if not args.no_cache:
            write_cache(path, key, feats, gallery.items)
            log.info("cached the gallery embeddings in %s", path)
    return feats, key, path


def l2_normalize(x: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """Rows scaled to unit length in float32 (as ``F.normalize``, eps 1e-12), so inner product = cosine.

    ``inplace``: scale ``x`` itself when it is float32 (a 1M-photo gallery is 3 GB: no second copy)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # [N, 1]
    if inplace:
        x /= norms
        return x
    return x / norms


# ----------------------------------------------------------------------------- exact search
def _stable_top(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best candidates per row ``[Q, C]``, best first, equal scores in gallery order."""
    by_id = torch.argsort(ids, dim=1)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), ids.gather(1, order)


class ExactIndex:
    """Every gallery vector scored: a matrix product per chunk of :data:`EXACT_CHUNK` rows, on ``device``.

    A running top K is kept across chunks, so the memory is ``[Q, chunk]`` whatever the gallery size.
    """
    kind = "exact"

    def __init__(self, feats: np.ndarray, device: torch.device = torch.device("cpu")):
        self.device = device
        self.feats = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)).to(device)  # [G, D]

    def __len__(self) -> int:
        return self.feats.shape[0]

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [Q, k] float32, ids [Q, k] int64)`` of normalised ``queries [Q, D]``, best first."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)  # [Q, D]
        best_s = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=self.device)
        for start in range(0, len(self), EXACT_CHUNK):
            sims = q @ self.feats[start:start + EXACT_CHUNK].T  # [Q, C]
            kk = min(k, sims.shape[1])
            s, i = sims.topk(kk, dim=1)  # [Q, kk]
            # topk breaks ties arbitrarily: where the kk-th score ties with one left out, take the chunk's
            # stable top kk instead, so equal scores keep the gallery order as a full stable sort would.
            for r in torch.nonzero((sims >= s[:, -1:]).sum(1) > kk).flatten().tolist():
                row_s, row_i = torch.sort(sims[r], descending=True, stable=True)
                s[r], i[r] = row_s[:kk], row_i[:kk]
            best_s, best_i = _stable_top(torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1), k)
        return best_s.cpu().numpy(), best_i.cpu().numpy()


# ----------------------------------------------------------------------------- FAISS
def import_faiss(required: bool):
    """The ``faiss`` module (faiss-gpu or faiss-cpu, whichever is installed), or None when absent and not required."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU build it does not find
    try:
        import faiss
    except ImportError:
        if required:
            raise ToolError("--index faiss needs FAISS: pip install faiss-cpu (or faiss-gpu on a CUDA machine), "
                            "or use --index exact.") from None
        return None
    return faiss


def ivf_cells(num: int) -> int:
    """IVF cells for ``num`` vectors: ``IVF_CELLS_PER_SQRT``·√num, with at least 39 training vectors per cell."""
    return max(1, min(round(IVF_CELLS_PER_SQRT * math.sqrt(num)), num // IVF_MIN_TRAIN_PER_CELL))


def default_nprobe(nlist: int) -> int:
    return max(1, min(nlist, round(nlist * NPROBE_FRACTION)))


def _gpu_resources(faiss, device: torch.device):
    """FAISS GPU resources when faiss-gpu is installed and the search runs on CUDA, else None."""
    if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    return faiss.StandardGpuResources()


class FaissIndex:
    """An IVF-Flat FAISS index over normalised vectors (inner product = cosine), on the GPU with faiss-gpu.

    ``cpu_index`` is what is cached; ``index`` what is searched (its GPU copy when there is one).
    """
    kind = "faiss"

    def __init__(self, cpu_index, *, nprobe: int | None = None, device: torch.device = torch.device("cpu"),
                 gpu_index=None, resources=None):
        self.faiss = import_faiss(required=True)
        self.cpu_index = cpu_index
        self.nlist = int(cpu_index.nlist)
        self.nprobe = max(1, min(self.nlist, nprobe or default_nprobe(self.nlist)))
        self._resources = resources or (None if gpu_index is not None else _gpu_resources(self.faiss, device))
        if gpu_index is None and self._resources is not None:
            gpu_index = self.faiss.index_cpu_to_gpu(self._resources, device.index or 0, cpu_index)
        self.index = gpu_index if gpu_index is not None else cpu_index

    def __len__(self) -> int:
        return int(self.cpu_index.ntotal)

    @classmethod
    def build(cls, feats: np.ndarray, *, nlist: int | None = None, nprobe: int | None = None,
              device: torch.device = torch.device("cpu"), seed: int = 0) -> "FaissIndex":
        """Train the cells (k-means on a seeded sample of at most 64 vectors per cell) and add every vector."""
        faiss = import_faiss(required=True)
        feats = np.ascontiguousarray(feats, dtype=np.float32)  # [G, D]
        nlist = nlist or ivf_cells(len(feats))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(feats.shape[1]), feats.shape[1], nlist,
                                   faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = min(len(feats), nlist * IVF_MAX_TRAIN_PER_CELL)
        rows = np.sort(np.random.default_rng(seed).choice(len(feats), sample, replace=False))
        resources = _gpu_resources(faiss, device)
        target = index if resources is None else faiss.index_cpu_to_gpu(resources, device.index or 0, index)
        target.train(feats[rows])
        target.add(feats)
        cpu_index = target if resources is None else faiss.index_gpu_to_cpu(target)
        return cls(cpu_index, nprobe=nprobe, device=device, gpu_index=None if resources is None else target,
                   resources=resources)

    def to_bytes(self) -> np.ndarray:
        return self.faiss.serialize_index(self.cpu_index)  # uint8 [bytes]

    @classmethod
    def from_bytes(cls, data: np.ndarray, **kwargs) -> "FaissIndex":
        return cls(import_faiss(required=True).deserialize_index(np.asarray(data, dtype=np.uint8)), **kwargs)

    def _set_nprobe(self, nprobe: int) -> None:
        if self.index is self.cpu_index:
            self.index.nprobe = nprobe
        else:
            self.faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [Q, k] float32, ids [Q, k] int64)``, best first, equal scores in gallery order."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # [Q, D]
        nprobe = self.nprobe
        while True:
            self._set_nprobe(nprobe)
            scores, ids = self.index.search(queries, k)  # [Q, k]; id -1 where the cells visited hold < k
            if (ids >= 0).all() or nprobe >= self.nlist:
                break
            nprobe = min(self.nlist, 2 * nprobe)  # too few vectors in the cells visited: visit more
        s, i = _stable_top(torch.from_numpy(scores), torch.from_numpy(ids.astype(np.int64)), k)
        return s.numpy(), i.numpy()


def faiss_cache_file(embedding_cache: Path) -> Path:
    """The FAISS index is cached beside the embeddings, in the same slot (a changed gallery replaces it)."""
    return embedding_cache.with_name(embedding_cache.stem + "-faiss.npz")


def open_faiss_index(feats: np.ndarray, *, key: str, cache: Path | None, nprobe: int | None,
                     device: torch.device) -> FaissIndex:
    """The IVF-Flat index of ``feats``: from ``cache`` when it was built for the same embeddings, else built
    (and cached when ``cache`` is given)."""
    nlist = ivf_cells(len(feats))
    index_key = hashlib.sha256(json.dumps([FAISS_FORMAT, key, nlist]).encode()).hexdigest()
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as data:
                if str(data["key"]) == index_key:
                    log.info("using the cached FAISS index %s", cache)
                    return FaissIndex.from_bytes(data["index"], nprobe=nprobe, device=device)
        except Exception as e:  # an unreadable cache is only a cache: build again
            log.warning("ignoring unreadable FAISS index cache %s (%s)", cache, e)
    log.info("building a FAISS IVF-Flat index (%d cells) over %d vectors", nlist, len(feats))
    index = FaissIndex.build(feats, nlist=nlist, nprobe=nprobe, device=device)
    if cache is not None:
        with atomic_write(cache, "wb") as f:
            np.savez(f, key=np.array(index_key), index=index.to_bytes())
        log.info("cached the FAISS index in %s", cache)
    return index


def choose_index(kind: str, num: int) -> str:
    """``exact`` or ``faiss`` for ``--index kind`` and a gallery of ``num`` photos (auto: by size, FAISS if installed)."""
    if kind != "auto":
        return kind
    if num <= FAISS_MIN_GALLERY:
        return "exact"
    if import_faiss(required=False) is None:
        log.warning("%d gallery photos: FAISS would be faster but is not installed (pip install faiss-cpu); "
                    "searching exactly", num)
        return "exact"
    return "faiss"


# ----------------------------------------------------------------------------- the search
@dataclass
class Hit:
    """One result: gallery position, file, cosine score, class (None when unknown)."""
    index: int
    path: str
    score: float
    cls: str | None

    def as_json(self) -> dict:
        return {"path": self.path, "score": self.score, "class": self.cls}


class SketchSearch:
    """A checkpoint's encoder, a gallery and its index: :meth:`search` takes a sketch image, gives the top K."""

    def __init__(self, model, gallery: Gallery, index, *, image_size: int, device: torch.device):
        import threading

        self.model, self.gallery, self.index = model, gallery, index
        self.image_size, self.device = image_size, device
        self._lock = threading.Lock()  # a web server calls from several threads; FAISS's nprobe is shared state

    @classmethod
    def open(cls, args, ckpt: dict, gallery: Gallery) -> "SketchSearch":
        """Model, embeddings (cached) and index for ``args`` (``checkpoint``, :func:`add_search_args`'s flags)."""
        if args.batch_size < 1:
            raise ToolError(f"--batch_size must be positive, got {args.batch_size}")
        kind = choose_index(args.index, len(gallery.items))
        if kind == "faiss":
            import_faiss(required=True)  # before the (long) embedding, not after
        device = select_device(args.device)
        model = build_from_checkpoint(ckpt, args.checkpoint, device)
        image_size = checkpoint_settings(ckpt, args.checkpoint)["image_size"]
        feats, key, path = gallery_features(args, model, gallery, image_size, device)  # [G, D]
        feats = l2_normalize(feats, inplace=True)  # ours: read from the cache or just computed
        if kind == "exact":
            index = ExactIndex(feats, device)
        else:
            index = open_faiss_index(feats, key=key, cache=None if args.no_cache else faiss_cache_file(path),
                                     nprobe=args.nprobe, device=device)
        log.info("searching %d gallery photos with the %s index", len(gallery.items), index.kind)
        return cls(model, gallery, index, image_size=image_size, device=device)

    @torch.no_grad()
    def embed(self, sketch) -> np.ndarray:
        """The normalised embedding ``[1, D]`` of a sketch (a PIL image), preprocessed as a dataset sketch."""
        from datasets.transforms import preprocess_sketch

        x = preprocess_sketch(sketch, self.image_size)[None].to(self.device)  # [1, 3, S, S]
        return l2_normalize(self.model.encode(x, "sketch").float().cpu().numpy())  # [1, D]

    def search(self, sketch, k: int) -> list[Hit]:
        """The ``k`` gallery photos closest to ``sketch`` (a PIL image) by cosine, best first."""
        if not 1 <= k <= len(self.gallery.items):
            raise ToolError(f"top K must be between 1 and the gallery size, {len(self.gallery.items)} images; "
                            f"got {k}.")
        with self._lock:
            scores, ids = self.index.search(self.embed(sketch), k)  # [1, k]
        items = self.gallery.items
        return [Hit(int(g), items[g][0], float(s), items[g][1] or None) for s, g in zip(scores[0], ids[0])]
